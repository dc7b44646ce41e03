"""Built-in roles and the permissions (verbs on resources) each grants.

The table is the default RBAC policy; custom roles are added by decisions in the decided log.
"""

from __future__ import annotations

# Agent messaging (protocols/messages.py): direct requests, topic publishing, role broadcasts,
# and being delivered to at all. Granted by work roles, not to every member, so a node can hold
# agents that may only listen, or neither.
_TALK = frozenset({"messages.send", "messages.receive", "messages.publish"})
_ANNOUNCE = _TALK | {"messages.broadcast"}

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
            *_ANNOUNCE,
        }
    ),
    "validator": frozenset({"consensus.participate"}),
    "planner": frozenset({"task.create", "task.cancel", "decision.propose", "decision.vote"})
    | _ANNOUNCE,
    "executor": frozenset({"task.claim", "task.submit", "task.progress", "decision.vote"}) | _TALK,
    "reviewer": frozenset({"task.review", "decision.vote"}) | _TALK,
    "patrol": frozenset({"task.inspect", "task.flag", "decision.vote"}) | _TALK,
    "supervisor": frozenset(
        {
            "task.pause",
            "task.resume",
            "task.cancel",
            "task.reassign",
            "swarm.pause",
            "decision.vote",
            *_ANNOUNCE,
        }
    ),
}
BUILTIN_ROLES = frozenset(PERMISSIONS)
# Every member may do these whatever its roles: report presence, read.
BASE_PERMISSIONS = frozenset({"presence.publish", "state.read"})


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
