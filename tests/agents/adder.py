"""Exec agent for the tests: sums its input n and its dependencies' outputs; optional sleep.
Leaves scratch files in its working directory, as real agents do (the daemon removes them)."""

import json
import os
import sys
import time

task = json.load(sys.stdin)
os.makedirs("scratch/sub")
with open("scratch/sub/notes.txt", "w") as f:
    f.write(task["id"])
inp = task.get("input") or {}
time.sleep(float(inp.get("sleep", 0)))
deps = task.get("inputs_from_dependencies") or {}
total = int(inp.get("n", 0)) + sum(int(v.get("n", 0)) for v in deps.values())
print(json.dumps({"n": total}))
