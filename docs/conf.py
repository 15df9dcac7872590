"""Sphinx configuration: the Pallets theme Flask's extensions use, pages in Markdown (MyST), API from docstrings.

Built in CI with warnings as errors: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""

from pallets_sphinx_themes import ProjectLink, get_version

project = "flask_idempotent"
copyright = "flask_idempotent developers"
author = "flask_idempotent developers"
release, version = get_version("flask-idempotency")  # the distribution's name; the import name differs

extensions = [
    "sphinx.ext.autodoc",
    "myst_parser",
    "pallets_sphinx_themes",
]
# No sphinx.ext.intersphinx: it fetches the other projects' inventories over the network at every build, and
# the build must work offline. Names of Flask, SQLAlchemy etc. in docstrings stay plain text.

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# Links between pages are written as GitHub renders them (`record.md#time-the-databases-clock-decides`), so the
# pages read the same on GitHub; MyST makes the same anchors for headings down to ###.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_preserve_defaults = True
# An override without a docstring of its own (httpx's handle_request, werkzeug's get_body) is left out rather than
# shown with the other library's text.
autodoc_inherit_docstrings = False
autodoc_default_options = {"members": True, "show-inheritance": True}

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_context = {
    "project_links": [
        ProjectLink("PyPI releases", "https://pypi.org/project/flask-idempotency/"),
        ProjectLink("Changes", "changelog.html"),
    ]
}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
singlehtml_sidebars = {"index": ["project.html", "localtoc.html"]}
html_title = f"flask_idempotent Documentation ({version})"
html_show_sourcelink = False
# The theme's "newer version" banner asks PyPI about the project named after `project`: "flask-idempotent" is an
# unrelated project there, so the banner stays off.
version_banner = False
