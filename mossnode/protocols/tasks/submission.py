"""Submissions and reviews as requests: validated before anything is written.

The daemon calls these when a local agent submits a deliverable or a review through the API
(and the scheduler calls them for exec agents). A refusal changes nothing; an accepted request
comes back as the effect to write. The lifecycle applies the same rules again to whatever
arrives from other nodes, so a faulty node that skips these checks gains nothing: its
submission is not counted, or counts as a breach.
"""

from __future__ import annotations

from typing import Any

from .contract import validate
from .effects import Submit, SubmitReview
from .lifecycle import Status
from .model import VERDICTS, State, Task
from .params import Params
from .review import independent
from .supervision import Refused

SUBMITTABLE = frozenset({State.IN_PROGRESS, State.REWORK})


def plan_submit(
    task: Task,
    status: Status,
    *,
    node: str,
    agent: str,
    output: Any,
    ok: bool = True,
    error: str | None = None,
) -> Submit | Refused:
    """Only the current assignee (node and agent) submits, only while it holds the work, and
    only an output that satisfies the contract's ``output_schema``."""
    if status.state not in SUBMITTABLE:
        return Refused(
            "state",
            f"task {task.id} is {status.state.value}; only in_progress or rework work is submitted",
        )
    if status.assignee != node or status.agent != agent:
        holder = f"{status.assignee}/{status.agent}" if status.assignee else "nobody"
        return Refused(
            "not_assignee", f"{node}/{agent} is not the assignee of {task.id} (held by {holder})"
        )
    if ok:
        bad = validate(output, task.contract.output_schema)
        if bad is not None:
            return Refused("output_schema", f"output violates output_schema {bad}")
    return Submit(
        task.id,
        status.attempt,
        status.round,
        agent,
        ok,
        output if ok else None,
        error if not ok else None,
    )


def plan_review(
    task: Task,
    status: Status,
    *,
    node: str,
    agent: str,
    score: Any,
    verdict: Any,
    comments: str = "",
    params: Params | None = None,
) -> SubmitReview | Refused:
    """A review of the submission waiting in review, by someone other than its author."""
    p = params or Params()
    if status.state is not State.REVIEW:
        return Refused(
            "state", f"task {task.id} is {status.state.value}; there is no submission to review"
        )
    if not independent(node, agent, status.assignee, status.agent, p.same_node_review):
        return Refused(
            "self_review",
            f"{node}/{agent} cannot review work by {status.assignee}/{status.agent}: reviews must be independent",
        )
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        return Refused("bad_score", "score must be an integer from 1 to 5")
    if verdict not in VERDICTS:
        return Refused("bad_verdict", f"verdict must be one of {list(VERDICTS)}")
    return SubmitReview(task.id, status.attempt, status.round, agent, score, str(verdict), comments)
