"""Set two benchmark runs' targets side by side, as a Markdown table.

    .venv/bin/python bench/compare.py bench/results/before-71e7be3.json bench/results/results.json

Rows are matched by target name, without the name of the slowest query (it differs between runs); a target one
run lacks shows as "-".
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any


def _name(target: str) -> str:
    target = re.sub(r" \((operations|store)\.[^)]*\)", "", target)  # which query was slowest differs per run
    target = target.replace(" (default pause)", "")  # the purge pause became the default
    target = re.sub(r"with [\d,]+ conflict events", "with 1M conflict events", target)
    return re.sub(r"over [\d,]+ requests", "over 100k requests", target)


def _cell(t: dict[str, Any] | None) -> str:
    if t is None:
        return "-"
    value = t["value"]
    text = (", ".join(value) or "none") if isinstance(value, list) else f"{value:.2f}"
    return text if t["met"] else f"**{text}**"


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    old = {_name(t["target"]): t for t in before.get("targets", [])}
    new = {_name(t["target"]): t for t in after.get("targets", [])}
    lines = [
        f"| Target | Goal | Before ({before['run_id']}) | After ({after['run_id']}) |",
        "|---|---|---:|---:|",
    ]
    for name in [*new, *(n for n in old if n not in new)]:
        goal = (new.get(name) or old[name])["goal"]
        lines.append(f"| {name} | {goal} | {_cell(old.get(name))} | {_cell(new.get(name))} |")
    return "\n".join(lines) + "\n\nBold: the target is missed.\n"


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    before, after = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    print(compare(before, after))
    return 0


if __name__ == "__main__":
    sys.exit(main())
