"""Reputation, derived from the replicated history and never self-reported.

Every replica computes the same numbers from the same task view: the outcomes of attempts (done,
or which fault closed them), independent review scores, contract breaches (deadline missed,
output violating its schema) and latency. Entries are kept per (node, agent, capability); a task
without required capabilities counts under ``"*"``.

Score in [0, 1], rounded to 6 decimals::

    reliability = (done + 1) / (done + failed + deadline + schema + 2)
                  # failed counts every faulty attempt; breaches count again: they cost double
    quality     = (avg_review - 1) / 4            or 0.5 without reviews
    speed       = mean(1 - latency / deadline_ms) over done attempts with a deadline, or 0.5
    score       = 0.6 * reliability + 0.25 * quality + 0.15 * speed

A newcomer scores 0.5 everywhere, so new nodes' agents win bids without configuration. Known
limits: an attempt closed because a partition hid its lease counts against its assignee; a node
that re-bids on a task it held before overwrites its older entries, so that older attempt is
forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .allocation import NEUTRAL
from .lifecycle import Status
from .model import TaskView
from .review import independent

ANY = "*"


@dataclass(slots=True)
class Stats:
    done: int = 0
    failed: int = 0
    deadline: int = 0
    schema: int = 0
    no_show: int = 0
    review_sum: int = 0
    reviews: int = 0
    latency_sum: int = 0
    latencies: int = 0
    speed_sum: float = 0.0
    speeds: int = 0

    def add(self, other: Stats) -> None:
        for name in Stats.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def avg_review(self) -> float | None:
        return self.review_sum / self.reviews if self.reviews else None

    @property
    def score(self) -> float:
        reliability = (self.done + 1) / (self.done + self.failed + self.deadline + self.schema + 2)
        avg = self.avg_review
        quality = (avg - 1) / 4 if avg is not None else 0.5
        speed = self.speed_sum / self.speeds if self.speeds else 0.5
        return round(0.6 * reliability + 0.25 * quality + 0.15 * speed, 6)


Key = tuple[str, str, str]  # node, agent, capability


class Reputation:
    """A table of :class:`Stats`; cheap lookups for bids, a leaderboard for humans."""

    def __init__(self, stats: Mapping[Key, Stats] | None = None) -> None:
        self.stats: dict[Key, Stats] = dict(stats or {})

    def score(self, node: str, agent: str, capabilities: Iterable[str]) -> float:
        """Mean score over the capabilities (``NEUTRAL`` where there is no history)."""
        caps = list(capabilities) or [ANY]
        vals = [
            self.stats[k].score if (k := (node, agent, c)) in self.stats else NEUTRAL for c in caps
        ]
        return round(sum(vals) / len(vals), 6)

    def per_agent(self) -> dict[tuple[str, str], Stats]:
        out: dict[tuple[str, str], Stats] = {}
        for (node, agent, _cap), st in sorted(self.stats.items()):
            out.setdefault((node, agent), Stats()).add(st)
        return out

    def leaderboard(self) -> list[dict[str, Any]]:
        """``[{agent, node, score, done, failed, ...}]``, best first, ties by node then agent."""
        rows: list[dict[str, Any]] = []
        for (node, agent), st in self.per_agent().items():
            caps = {
                c: s.score
                for (n, a, c), s in sorted(self.stats.items())
                if n == node and a == agent
            }
            avg = st.avg_review
            rows.append(
                {
                    "agent": agent,
                    "node": node,
                    "score": st.score,
                    "done": st.done,
                    "failed": st.failed,
                    "deadline_breaches": st.deadline,
                    "schema_violations": st.schema,
                    "no_shows": st.no_show,
                    "avg_review": round(avg, 3) if avg is not None else None,
                    "reviews": st.reviews,
                    "avg_latency_ms": st.latency_sum // st.latencies if st.latencies else None,
                    "capabilities": caps,
                }
            )
        rows.sort(key=lambda r: (-r["score"], -r["done"], r["node"], r["agent"]))
        return rows


def reputation(
    view: TaskView, statuses: Mapping[str, Status], same_node_review: bool = False
) -> Reputation:
    """Fold every task's attempt outcomes and reviews into a :class:`Reputation`."""
    table: dict[Key, Stats] = {}

    def bump(node: str, agent: str, caps: tuple[str, ...]) -> list[Stats]:
        return [table.setdefault((node, agent, c), Stats()) for c in (caps or (ANY,))]

    for tid in sorted(view):
        st = statuses.get(tid)
        if st is None:
            continue
        task = view[tid]
        caps = task.capabilities
        holders: dict[int, tuple[str, str]] = {}
        for o in st.outcomes:
            if o.node is None or o.agent is None:
                continue
            holders[o.attempt] = (o.node, o.agent)
            for s in bump(o.node, o.agent, caps):
                if o.kind == "done":
                    s.done += 1
                    if o.claimed_at is not None and o.submitted_at is not None:
                        lat = max(0, o.submitted_at - o.claimed_at)
                        s.latency_sum += lat
                        s.latencies += 1
                        dl = task.contract.deadline_ms
                        if dl:
                            s.speed_sum += max(0.0, 1.0 - lat / dl)
                            s.speeds += 1
                elif o.fault:
                    s.failed += 1
                    if o.kind == "deadline":
                        s.deadline += 1
                    elif o.kind == "schema":
                        s.schema += 1
                    elif o.kind == "no_claim":
                        s.no_show += 1
        if st.assignee is not None and st.agent is not None and st.claimed:
            holders.setdefault(st.attempt, (st.assignee, st.agent))
        for rnode in sorted(task.reviews):
            r = task.reviews[rnode]
            holder = holders.get(r.attempt)
            if holder is None or not independent(
                rnode, r.agent, holder[0], holder[1], same_node_review
            ):
                continue
            for s in bump(holder[0], holder[1], caps):
                s.review_sum += r.score
                s.reviews += 1
    return Reputation(table)


def leaderboard(
    view: TaskView, statuses: Mapping[str, Status], same_node_review: bool = False
) -> list[dict[str, Any]]:
    """What ``mossnode leaderboard --json`` prints."""
    return reputation(view, statuses, same_node_review).leaderboard()
