"""Task orchestration, sans-IO: the task model, its derived state machine, DAGs, contracts,
allocation by bids, leases and failover, reviews, reputation, supervision, recurring tasks, and
one node's scheduler. No I/O, no clock, no randomness: time comes in as ``now_ms``, effects go
out as values. See docs/tasks.md.
"""

from .allocation import LocalAgent, bid_score, capable, tiebreak, window, winner
from .contract import Violation, check_schema, storable, validate
from .control import Authority
from .effects import (
    Bid,
    Cancel,
    Claim,
    Control,
    Create,
    Dispatch,
    DispatchReview,
    Effect,
    LateResult,
    Plan,
    Progress,
    ProposeExclusive,
    Release,
    RenewLease,
    Submit,
    SubmitReview,
    Write,
    writes,
)
from .lifecycle import Accepted, Outcome, Status, derive, derive_all, inputs_from_dependencies
from .model import SUB_KINDS, TERMINAL, Contract, State, Task, TaskView, View, build_view
from .params import Params
from .recurring import Schedule, due, period_suffix
from .reputation import Reputation, Tally, leaderboard, reputation
from .scheduler import Finished, Run, Scheduler
from .stability import Horizons, Stable, stable_rule
from .submission import plan_review, plan_submit
from .supervision import (
    Draft,
    Limits,
    Refused,
    check_deps_update,
    check_raw_contract,
    plan_control,
    plan_create,
)

__all__ = [
    "SUB_KINDS",
    "TERMINAL",
    "Accepted",
    "Authority",
    "Bid",
    "Cancel",
    "Claim",
    "Contract",
    "Control",
    "Create",
    "Dispatch",
    "DispatchReview",
    "Draft",
    "Effect",
    "Finished",
    "Horizons",
    "LateResult",
    "Limits",
    "LocalAgent",
    "Outcome",
    "Params",
    "Plan",
    "Progress",
    "ProposeExclusive",
    "Refused",
    "Release",
    "RenewLease",
    "Reputation",
    "Run",
    "Schedule",
    "Scheduler",
    "Stable",
    "State",
    "Status",
    "Submit",
    "SubmitReview",
    "Tally",
    "Task",
    "TaskView",
    "View",
    "Violation",
    "Write",
    "bid_score",
    "build_view",
    "capable",
    "check_deps_update",
    "check_raw_contract",
    "check_schema",
    "derive",
    "derive_all",
    "due",
    "inputs_from_dependencies",
    "leaderboard",
    "period_suffix",
    "plan_control",
    "plan_create",
    "plan_review",
    "plan_submit",
    "reputation",
    "stable_rule",
    "storable",
    "tiebreak",
    "validate",
    "window",
    "winner",
    "writes",
]
