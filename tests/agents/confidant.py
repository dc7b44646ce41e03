"""Exec agent for the confidentiality tests: sums n like adder.py and answers its input's
secret reversed, so the output holds a marker that the input does not."""

import json
import sys

task = json.load(sys.stdin)
inp = task.get("input") or {}
deps = task.get("inputs_from_dependencies") or {}
total = int(inp.get("n", 0)) + sum(int(v.get("n", 0)) for v in deps.values())
print(json.dumps({"n": total, "seen": str(inp.get("secret", ""))[::-1]}))
