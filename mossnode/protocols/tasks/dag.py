"""Dependency graphs (``deps``) and task trees (``parent``).

Two different relations: ``deps`` is the DAG of "runs after" (a task is ready when all its deps
are done, and it receives their outputs); ``parent`` is the tree of "was planned by", which
supervision bounds (fan-out, depth, budget) and which cancel/pause act on.

Creation refuses a dependency cycle, but a cycle can still appear in the replicated view (a
creator edits ``deps`` later, or a faulty one names a task that does not exist yet), so the
lifecycle treats tasks on a cycle as blocked rather than trusting the check at creation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .model import Task, TaskView


def find_cycle(view: TaskView, tid: str, deps: Iterable[str]) -> list[str] | None:
    """The cycle that giving ``tid`` these ``deps`` would close, as ``[tid, ..., tid]``.

    Walks the existing "depends on" edges from each new dep; reaching ``tid`` again means a
    cycle. Deterministic: deps in the order given, each task's deps in stored order.
    """
    for start in deps:
        if start == tid:
            return [tid, tid]
        # iterative DFS keeping the path, so the reason can show the whole cycle
        stack: list[tuple[str, int]] = [(start, 0)]
        path = [start]
        seen = {start}
        while stack:
            node, i = stack[-1]
            task = view.get(node)
            nexts = task.deps if task is not None else ()
            if i >= len(nexts):
                stack.pop()
                path.pop()
                continue
            stack[-1] = (node, i + 1)
            nxt = nexts[i]
            if nxt == tid:
                return [tid, *path, tid]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, 0))
                path.append(nxt)
    return None


def children(view: TaskView) -> dict[str, list[str]]:
    """``{parent id: [child ids sorted]}`` for parents that have children."""
    out: dict[str, list[str]] = {}
    for tid in sorted(view):
        parent = view[tid].parent
        if parent is not None:
            out.setdefault(parent, []).append(tid)
    return out


def ancestors(view: TaskView, tid: str) -> list[str]:
    """Parent chain from ``tid``'s parent up to the root (stops on a parent cycle)."""
    out: list[str] = []
    seen = {tid}
    task = view.get(tid)
    while task is not None and task.parent is not None and task.parent not in seen:
        out.append(task.parent)
        seen.add(task.parent)
        task = view.get(task.parent)
    return out


def depth(view: TaskView, tid: str) -> int:
    """0 for a root task, 1 for its children, ..."""
    return len(ancestors(view, tid))


def root_of(view: TaskView, tid: str) -> str:
    chain = ancestors(view, tid)
    return chain[-1] if chain else tid


def subtree(view: TaskView, root: str, kids: Mapping[str, list[str]] | None = None) -> list[str]:
    """``root`` and all its descendants by ``parent``, root first, then breadth-first."""
    kids = children(view) if kids is None else kids
    out, seen, i = [root], {root}, 0
    while i < len(out):
        for child in kids.get(out[i], ()):
            if child not in seen:
                seen.add(child)
                out.append(child)
        i += 1
    return out


def dependents(view: TaskView) -> dict[str, list[str]]:
    """``{task id: [ids of tasks that depend on it]}``."""
    out: dict[str, list[str]] = {}
    for tid in sorted(view):
        for dep in view[tid].deps:
            out.setdefault(dep, []).append(tid)
    return out


def topological(view: Mapping[str, Task]) -> list[str]:
    """Tasks ordered so that deps come first (tasks on cycles last, in id order)."""
    indeg = {tid: sum(1 for d in view[tid].deps if d in view) for tid in view}
    users = dependents(view)
    ready = sorted(t for t, n in indeg.items() if n == 0)
    out: list[str] = []
    while ready:
        tid = ready.pop(0)
        out.append(tid)
        for user in users.get(tid, ()):
            indeg[user] -= 1
            if indeg[user] == 0:
                ready.append(user)
        ready.sort()
    placed = set(out)
    out.extend(sorted(t for t in view if t not in placed))
    return out
