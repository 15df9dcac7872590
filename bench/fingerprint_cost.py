"""What the request fingerprint costs against Flask's own parse of the same body, per body shape.

    .venv/bin/python bench/fingerprint_cost.py                 # every shape, 5 interleaved repetitions
    .venv/bin/python bench/fingerprint_cost.py --shape json-1e-7 --repeat 9
    .venv/bin/python bench/fingerprint_cost.py --markdown      # the tables for docs/performance.md

For each shape a body of about 9.5 MiB (under the default IDEMPOTENCY_MAX_BODY_BYTES of 10 MiB) is built once.
Two things are measured on it, in a fresh request context each time, alternating, several times:

- **Flask**: what a view does to read it: ``request.get_json()``, ``request.form``, or ``request.form`` and
  ``request.files`` for multipart (MAX_FORM_PARTS raised to let 10k parts through);
- **layer**: ``hash_command(request_fingerprint(request))``, what the extension runs for every keyed request
  before the view (the body read within the limit, its canonical form, the hash).

CPU time is ``time.process_time()`` around the call (the request context is built outside it); the table
shows the median of the repetitions. Peak memory is measured in separate repetitions under ``tracemalloc``
(which slows the code, so never in the timed ones): the peak of Python allocations during the call above what
was allocated before it (the body itself, held by the request, is outside it for both). The target: the layer
within 2x of Flask in both (docs/performance.md, "The fingerprint's cost").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flask_idempotent.fingerprint import hash_command, request_fingerprint  # noqa: E402

SIZE = 9_500_000  # bytes: under the default limit of 10 MiB
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"
BOUNDARY = "bench-boundary-7d9f"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _repeat(unit: bytes, size: int = SIZE) -> bytes:
    return unit * (size // len(unit))


def _json_array(items: list[str]) -> bytes:
    return ("[" + ",".join(items) + "]").encode()


def _items(make: Callable[[int], str], budget: int = SIZE) -> list[str]:
    items, used, i = [], 2, 0
    while used < budget:
        item = make(i)
        items.append(item)
        used += len(item) + 1
        i += 1
    return items


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _multipart(parts: int) -> bytes:
    chunks = []
    filler = "x" * (SIZE // parts - 120)
    for i in range(parts):
        if i % 10 == 0:  # one part in ten a file
            header = f'Content-Disposition: form-data; name="file{i}"; filename="f{i}.txt"\r\nContent-Type: text/plain'
        else:
            header = f'Content-Disposition: form-data; name="field{i}"'
        chunks.append(f"--{BOUNDARY}\r\n{header}\r\n\r\n{filler}\r\n")
    chunks.append(f"--{BOUNDARY}--\r\n")
    return "".join(chunks).encode()


def shapes() -> dict[str, tuple[str, str, Callable[[], bytes]]]:
    """name -> (what it is, content type, body builder)."""
    rng = random.Random(7)
    return {
        "form-empty-fields": ("urlencoded `a=&a=&...` (3.2 M empty fields)", FORM, lambda: _repeat(b"a=&")),
        "form-short-fields": (
            "urlencoded `f0=v0&f1=v1&...` (760 k distinct short fields)",
            FORM,
            lambda: "&".join(_items(lambda i: f"f{i}=v{i}")).encode(),
        ),
        "form-escaped": (
            "urlencoded with percent escapes `n%C3%A9=caf%C3%A9&...`",
            FORM,
            lambda: _repeat(b"n%C3%A9=caf%C3%A9&"),
        ),
        "json-1e-7": ("JSON array of `1e-7` (1.9 M numbers)", JSON, lambda: _json_array(_items(lambda i: "1e-7"))),
        "json-small-ints": (
            "JSON array of small integers `0..9`",
            JSON,
            lambda: _json_array(_items(lambda i: str(i % 10))),
        ),
        "json-decimals": (
            "JSON array of distinct short decimals `0.001, 0.002, ...`",
            JSON,
            lambda: _json_array(_items(lambda i: repr((i + 1) / 1000))),
        ),
        "json-random-floats": (
            "JSON array of random doubles (17 digits each)",
            JSON,
            lambda: _json_array(_items(lambda i: repr(rng.random()))),
        ),
        "json-deep-objects": (
            "JSON array of objects nested 500 deep",
            JSON,
            lambda: _json_array(_items(lambda i: _nested(500))),
        ),
        "json-deep-arrays": (
            "JSON array of arrays nested 500 deep",
            JSON,
            lambda: _json_array(_items(lambda i: "[" * 500 + "1" + "]" * 500)),
        ),
        "json-wide-object": (
            "one JSON object with 560 k keys",
            JSON,
            lambda: ("{" + ",".join(_items(lambda i: f'"key{i}":{i}')) + "}").encode(),
        ),
        "json-records": (
            'JSON array of small records `{"id":1,"name":"n1","ok":true}`',
            JSON,
            lambda: _json_array(_items(lambda i: f'{{"id":{i},"name":"n{i}","ok":true}}')),
        ),
        "json-long-string": (
            "one JSON string of 9.5 MB (ASCII)",
            JSON,
            lambda: json.dumps("lorem ipsum dolor sit amet " * (SIZE // 27)).encode(),
        ),
        "json-long-string-unicode": (
            "one JSON string of non-ASCII text and emoji, with escapes",
            JSON,
            lambda: json.dumps(
                'caf\u00e9 \u6f22\u5b57 \U0001f600 "q" \\ \n' * (SIZE // 40), ensure_ascii=False
            ).encode(),
        ),
        "multipart-10k-parts": ("multipart, 10 k parts (one in ten a file)", MULTIPART, lambda: _multipart(10_000)),
    }


def _flask_parse(content_type: str) -> Callable[[], Any]:
    if content_type == JSON:
        return lambda: request.get_json()
    if content_type == FORM:
        return lambda: request.form
    return lambda: (request.form, request.files)


def _layer() -> Any:
    return hash_command(request_fingerprint(request))


def _measure(app: Flask, body: bytes, content_type: str, call: Callable[[], Any], *, memory: bool) -> float:
    with app.test_request_context("/", method="POST", data=body, content_type=content_type):
        if memory:
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            call()
            peak = tracemalloc.get_traced_memory()[1] - before
            tracemalloc.stop()
            return peak / 2**20  # MiB
        started = time.process_time()
        call()
        return (time.process_time() - started) * 1000  # ms


def run(names: list[str], repeat: int, memory_repeat: int) -> dict[str, Any]:
    app = Flask(__name__)
    app.config["MAX_FORM_PARTS"] = 20_000  # Flask's default (1,000) refuses the 10k-part body
    results: dict[str, Any] = {}
    for name in names:
        what, content_type, build = shapes()[name]
        body = build()
        flask_call, cpu, mem = _flask_parse(content_type), {"flask": [], "layer": []}, {"flask": [], "layer": []}
        for _ in range(repeat):  # interleaved: a drift in the machine's speed hits both alike
            cpu["flask"].append(_measure(app, body, content_type, flask_call, memory=False))
            cpu["layer"].append(_measure(app, body, content_type, _layer, memory=False))
        for _ in range(memory_repeat):
            mem["flask"].append(_measure(app, body, content_type, flask_call, memory=True))
            mem["layer"].append(_measure(app, body, content_type, _layer, memory=True))
        row = {
            "what": what,
            "bytes": len(body),
            "cpu_ms": {side: statistics.median(values) for side, values in cpu.items()},
            "cpu_ms_all": cpu,
            "peak_mib": {side: max(values) for side, values in mem.items()},
        }
        row["cpu_ratio"] = row["cpu_ms"]["layer"] / row["cpu_ms"]["flask"]
        row["peak_ratio"] = row["peak_mib"]["layer"] / row["peak_mib"]["flask"]
        results[name] = row
        print(
            f"{name:26} flask {row['cpu_ms']['flask']:8.0f} ms {row['peak_mib']['flask']:7.1f} MiB   "
            f"layer {row['cpu_ms']['layer']:8.0f} ms {row['peak_mib']['layer']:7.1f} MiB   "
            f"cpu x{row['cpu_ratio']:.2f}  peak x{row['peak_ratio']:.2f}",
            flush=True,
        )
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = []
    for name, row in results.items():
        lines += [
            f"**{name}**: {row['what']}, {row['bytes'] / 1e6:.1f} MB",
            "",
            "| | Flask's parse | fingerprint | ratio |",
            "|---|---:|---:|---:|",
            f"| CPU (median) | {row['cpu_ms']['flask']:.0f} ms | {row['cpu_ms']['layer']:.0f} ms | "
            f"{row['cpu_ratio']:.2f}x |",
            f"| peak memory | {row['peak_mib']['flask']:.1f} MiB | {row['peak_mib']['layer']:.1f} MiB | "
            f"{row['peak_ratio']:.2f}x |",
            "",
        ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(shapes()), help="only this shape (repeatable)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions of each side")
    parser.add_argument("--memory-repeat", type=int, default=2, help="tracemalloc repetitions of each side")
    parser.add_argument("--markdown", action="store_true", help="print the tables for docs/performance.md")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fingerprint_cost.json")
    args = parser.parse_args()
    results = run(args.shape or list(shapes()), args.repeat, args.memory_repeat)
    if not args.shape:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        print()
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
