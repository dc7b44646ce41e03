"""Demo exec agent: counts words of its input text, or merges its dependencies' counts.

Contract (CLI.md): the task arrives as JSON on stdin; one JSON value goes to stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter


def main() -> None:
    task = json.load(sys.stdin)
    inp = task.get("input") or {}
    deps = task.get("inputs_from_dependencies") or {}
    print("MOSS_PROGRESS 0.1 started", file=sys.stderr, flush=True)
    time.sleep(float(inp.get("work_s", 0.3)))  # pretend to think
    counts: Counter[str] = Counter()
    for out in deps.values():
        counts.update(out.get("counts", {}))
    counts.update(w.strip(".,;:!?").lower() for w in str(inp.get("text", "")).split() if w)
    top = dict(counts.most_common(int(inp.get("top", 10))))
    print(json.dumps({"counts": top, "words": sum(counts.values())}))


if __name__ == "__main__":
    main()
