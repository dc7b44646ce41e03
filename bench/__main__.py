"""Dispatch ``./scripts/bench NAME ...`` to the benchmark modules."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "envelopes": "bench.envelopes",
    "gossip": "bench.gossip",
    "api": "bench.api",
    "crdt": "bench.crdt",
    "tasks": "bench.tasks",
    "pbft": "bench.pbft",
}


def main() -> None:
    p = argparse.ArgumentParser(prog="scripts/bench")
    p.add_argument(
        "names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHES)}"
    )
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    if args.list:
        print("\n".join(BENCHES))
        return
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(BENCHES)}")
    for name in args.names or list(BENCHES):
        print(f"== {name}")
        importlib.import_module(BENCHES[name]).run()


if __name__ == "__main__":
    main()
