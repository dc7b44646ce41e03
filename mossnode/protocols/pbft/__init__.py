"""PBFT consensus among a swarm's validators, sans-IO (see docs/pbft.md).

:class:`Replica` and :class:`Client` are state machines: bytes and timer expiries in, effect
values out. :func:`verify_certificate` lets any node check a decided entry alone.
"""

from .application import Application, BatchHook, Execution, Outcome
from .certificate import Invalid, Verified, verify_certificate, verify_commits
from .client import TIMER_CLIENT, Client
from .config import PbftConfig, max_faulty, quorum
from .effects import (
    Completed,
    Decided,
    Effect,
    Persist,
    Reconfigured,
    Send,
    SendAll,
    SetTimer,
)
from .messages import (
    NULL_DIGEST,
    NULL_PAYLOAD,
    Entry,
    EnvelopeCache,
    batch_digest,
    batch_payload,
    digest,
    requests_of,
)
from .records import compact_records
from .replica import TIMER_RETRANSMIT, TIMER_VIEW, Replica

__all__ = [
    "NULL_DIGEST",
    "NULL_PAYLOAD",
    "TIMER_CLIENT",
    "TIMER_RETRANSMIT",
    "TIMER_VIEW",
    "Application",
    "BatchHook",
    "Client",
    "Completed",
    "Decided",
    "Effect",
    "Entry",
    "EnvelopeCache",
    "Execution",
    "Invalid",
    "Outcome",
    "PbftConfig",
    "Persist",
    "Reconfigured",
    "Replica",
    "Send",
    "SendAll",
    "SetTimer",
    "Verified",
    "batch_digest",
    "batch_payload",
    "compact_records",
    "digest",
    "max_faulty",
    "quorum",
    "requests_of",
    "verify_certificate",
    "verify_commits",
]
