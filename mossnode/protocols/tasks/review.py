"""Reviews: which review decides a submission, and who may write one.

OpenMOSS parity without its holes: a review scores 1-5 and says ``done`` or ``rework``; it is
independent (another node, and never the assignee agent itself); and when the contract requires
review, nothing else can move a submission to done. Several reviewers may review the same
submission (partitions, slow gossip): a valid ``done`` review decides it (the earliest by
(at, node) if several), else the earliest valid ``rework``; the others still count for
reputation. Done wins so that the decision is monotone: a node that saw one ``done`` review
derived the task done and its dependents ran on that output, and an earlier ``rework`` that
arrives later must not take that back.
"""

from __future__ import annotations

from .model import ReviewEntry, Task


def independent(
    reviewer_node: str,
    reviewer_agent: str,
    assignee_node: str | None,
    assignee_agent: str | None,
    same_node_review: bool = False,
) -> bool:
    """Is this reviewer someone other than the assignee?

    The node signs for all its agents, so by default only another node counts;
    ``same_node_review`` relaxes that to another agent on the same node.
    """
    if reviewer_node != assignee_node:
        return True
    return same_node_review and reviewer_agent != assignee_agent


def reviews_of(
    task: Task,
    attempt: int,
    rnd: int,
    assignee_node: str | None,
    assignee_agent: str | None,
    same_node_review: bool = False,
) -> list[tuple[str, ReviewEntry]]:
    """Valid reviews of submission (attempt, round), earliest first."""
    out = [
        (node, r)
        for node, r in task.reviews.items()
        if r.attempt == attempt
        and r.round == rnd
        and independent(node, r.agent, assignee_node, assignee_agent, same_node_review)
    ]
    out.sort(key=lambda nr: (nr[1].at, nr[0]))
    return out


def deciding_review(
    task: Task,
    attempt: int,
    rnd: int,
    assignee_node: str | None,
    assignee_agent: str | None,
    same_node_review: bool = False,
) -> tuple[str, ReviewEntry] | None:
    """The review that decides submission (attempt, round): the earliest valid ``done``,
    else the earliest valid review (a rework). See the module docstring for why."""
    found = reviews_of(task, attempt, rnd, assignee_node, assignee_agent, same_node_review)
    for nr in found:
        if nr[1].verdict == "done":
            return nr
    return found[0] if found else None
