"""What the testing kit's pytest plugin costs a test run that never uses it.

Installing flask-idempotency registers a pytest plugin (entry point ``pytest11``) that loads into every pytest
run of the environment. This times ``pytest`` on an empty test file, once as is and once with the plugin
switched off (``-p no:flask_idempotent``), in interleaved rounds (like hyperfine's ``--shuffle``: the variants
alternate, so a busy machine slows both alike), and prints the median and the fastest run of each and their
difference. The pair runs twice: with pytest-flask loaded, as in this project's own environment (pytest-flask
imports Flask by itself), and without it (``-p no:flask``), as in a project that does not use pytest-flask.

    .venv/bin/python bench/plugin_cost.py [--rounds 15] [--python OTHER_VENV/bin/python]

``--python`` times another environment, e.g. one with an older flask-idempotency installed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "with the plugin": [],
    "-p no:flask_idempotent": ["-p", "no:flask_idempotent"],
    "with the plugin, no pytest-flask": ["-p", "no:flask"],
    "-p no:flask_idempotent, no pytest-flask": ["-p", "no:flask_idempotent", "-p", "no:flask"],
}


def one_run(python: str, directory: Path, extra: list[str]) -> float:
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, "test_empty.py"]
    started = time.perf_counter()
    subprocess.run(command, cwd=directory, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--python", default=sys.executable, help="the interpreter of the environment to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        (directory / "test_empty.py").write_text("def test_nothing():\n    pass\n")
        times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for extra in VARIANTS.values():  # one warm-up each: the page cache, compiled bytecode
            one_run(args.python, directory, extra)
        for _ in range(args.rounds):
            for variant, extra in VARIANTS.items():
                times[variant].append(one_run(args.python, directory, extra))

    print(f"{args.rounds} interleaved rounds, {args.python}")
    for variant, runs in times.items():
        print(f"  {variant:42} median {statistics.median(runs):.3f} s   fastest {min(runs):.3f} s")
    names = list(VARIANTS)
    for on, off in ((names[0], names[1]), (names[2], names[3])):
        cost = statistics.median(times[on]) - statistics.median(times[off])
        print(f"  the plugin's cost ({on} - {off}): {cost * 1000:+.0f} ms (medians)")


if __name__ == "__main__":
    main()
