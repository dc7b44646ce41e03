"""Built-in roles and the permissions (verbs on resources) each grants.

The table is the default RBAC policy; custom roles are added by decisions in the decided log.
"""

from __future__ import annotations

PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset(
        {
            "member.invite",
            "member.remove",
            "role.grant",
            "role.revoke",
            "swarm.pause",
            "agent.manage",
            "decision.propose",
            "decision.vote",
            "task.create",
            "task.cancel",
        }
    ),
    "validator": frozenset({"consensus.participate"}),
    "planner": frozenset({"task.create", "task.cancel", "decision.propose", "decision.vote"}),
    "executor": frozenset({"task.claim", "task.submit", "task.progress", "decision.vote"}),
    "reviewer": frozenset({"task.review", "decision.vote"}),
    "patrol": frozenset({"task.inspect", "task.flag", "decision.vote"}),
    "supervisor": frozenset(
        {
            "task.pause",
            "task.resume",
            "task.cancel",
            "task.reassign",
            "swarm.pause",
            "decision.vote",
        }
    ),
}
BUILTIN_ROLES = frozenset(PERMISSIONS)
# Every member may do these whatever its roles: talk, report presence, read.
BASE_PERMISSIONS = frozenset({"presence.publish", "state.read", "messages.send"})


_MEMO: dict[frozenset[str], frozenset[str]] = {}
_MEMO_MAX = 4096


def permissions_of(roles: frozenset[str] | set[str]) -> frozenset[str]:
    """Everything ``roles`` grant. Memoized per frozenset of roles: the table above is a
    constant, and write authorization asks this once per update."""
    if isinstance(roles, frozenset):
        known = _MEMO.get(roles)
        if known is not None:
            return known
    out: set[str] = set(BASE_PERMISSIONS)
    for r in roles:
        out |= PERMISSIONS.get(r, frozenset())
    granted = frozenset(out)
    if isinstance(roles, frozenset):
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[roles] = granted
    return granted
