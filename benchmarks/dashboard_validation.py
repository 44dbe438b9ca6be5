"""Benchmark of what the dashboard does to each MQTT message it receives (issue 13 item 1),
against baselines taken in the same run.

Per topic, on the JSON examples of docs/mqtt-topics.md (the latest example of each topic;
``seq`` raised per message so that none is a repeat):

- (a) baseline: ``orjson.loads`` alone, what the dashboard did before it validated;
- (b) baseline: jsonschema's ``Draft202012Validator`` on the published schema as it is
  (``is_valid``), the obvious way to validate;
- (c) ``iortd.dashboard.schemas.schema_error``: the same verdict (a test keeps it equal), with
  ``$ref``s inlined and ``events`` split by ``kind`` at start;
- (d) ``iortd.dashboard.state.Rooms.receive``: everything (size, JSON, schema, plausibility,
  ``seq``, holding the message), i.e. the dashboard's cost per message.

Median of ``--rounds`` rounds of ``--n`` messages each, in µs per message, and messages/s
for (d). A benchmark, not a test: it exits 0 whatever the figures.

    .venv/bin/python benchmarks/dashboard_validation.py [--n N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from machine import REPO, print_header

from iortd.dashboard.schemas import STEMS, published, schema_error
from iortd.dashboard.state import Rooms

DOC = REPO / "docs" / "mqtt-topics.md"


def examples() -> dict[str, dict[str, Any]]:
    """The last example of each topic in docs/mqtt-topics.md, by topic name."""
    reference = {name: Draft202012Validator(published(name)) for name in STEMS}
    out: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```json\n(.*?)\n```", DOC.read_text("utf-8"), re.DOTALL):
        payload = json.loads(block)
        for name, v in reference.items():
            if v.is_valid(payload):
                out[name] = payload
    return out


def per_message_us(fn: Callable[[int], object], n: int, rounds: int) -> float:
    results = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        results.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="messages per round (default 2000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, median taken (default 5)")
    args = ap.parse_args()
    print_header("dashboard: cost of checking one MQTT message")
    print(f"  payloads   the examples of docs/mqtt-topics.md; {args.n} x {args.rounds} rounds")
    print()
    print(
        f"  {'topic':17} {'bytes':>6} {'(a) loads':>10} {'(b) schema':>11} "
        f"{'(c) ours':>9} {'(d) receive':>12} {'msg/s (d)':>10}"
    )
    for name, payload in sorted(examples().items()):
        raws = [orjson.dumps({**payload, "seq": i + 1}) for i in range(args.n)]
        whole = Draft202012Validator(published(name))
        parsed = orjson.loads(raws[0])

        def parse(i: int, raws: list[bytes] = raws) -> object:
            return orjson.loads(raws[i])

        def whole_schema(_i: int, v: Draft202012Validator = whole, p: object = parsed) -> object:
            return v.is_valid(p)

        def per_field(_i: int, n: str = name, p: object = parsed) -> object:
            return schema_error(n, p)

        a = per_message_us(parse, args.n, args.rounds)
        b = per_message_us(whole_schema, args.n, args.rounds)
        c = per_message_us(per_field, args.n, args.rounds)
        topic = f"iort/v1/{payload.get('site', 'hospital-a')}/{payload.get('room', 'or-1')}/{name}"
        d_rounds = []
        for _ in range(args.rounds):
            rooms = Rooms("iort")
            t0 = time.perf_counter()
            for data in raws:
                rooms.receive(topic, data, 0.0)
            d_rounds.append((time.perf_counter() - t0) / args.n * 1e6)
        d = statistics.median(d_rounds)
        print(
            f"  {name:17} {len(raws[0]):6d} {a:9.1f}µ {b:10.1f}µ {c:8.1f}µ {d:11.1f}µ "
            f"{1e6 / d:10,.0f}"
        )
    print()
    print("  µ = µs per message, median of the rounds; (b) and (c) give the same verdicts")


if __name__ == "__main__":
    main()
