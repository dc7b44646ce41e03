"""Who may call what on the local API: principals, their permissions, and the check.

Two kinds of caller reach the socket. The *operator* is a process of the daemon's own user (or
root), identified by the kernel (SO_PEERCRED), not by anything it sends; it may manage this
host's agents and join a swarm, and otherwise acts with the node's swarm roles only. An *agent*
presents its bearer token; its permissions are those of its roles that the node itself holds in
the swarm, since every node's peers judge its writes by the node's roles.
"""

from __future__ import annotations

from dataclasses import dataclass

from .roles import BASE_PERMISSIONS, permissions_of

# Local-host matters the operator may always do, whatever the swarm says.
OPERATOR_LOCAL = frozenset({"agent.manage", "swarm.join", "state.read"})


@dataclass(frozen=True)
class Principal:
    kind: str  # "operator" | "agent"
    name: str
    permissions: frozenset[str]
    roles: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Denial:
    status: int  # 401 or 403
    code: str
    message: str
    permission: str


def operator(uid: int, node_roles: frozenset[str]) -> Principal:
    return Principal(
        "operator", f"uid:{uid}", OPERATOR_LOCAL | permissions_of(node_roles), node_roles
    )


def agent(name: str, agent_roles: frozenset[str], node_roles: frozenset[str]) -> Principal:
    held = agent_roles & node_roles
    return Principal("agent", name, permissions_of(held) | BASE_PERMISSIONS, agent_roles)


def check(principal: Principal | None, permission: str) -> Denial | None:
    """None if allowed; otherwise a denial naming the missing permission."""
    if principal is None:
        return Denial(
            401, "unauthenticated", f"a valid agent token is required for {permission}", permission
        )
    if permission in principal.permissions:
        return None
    return Denial(
        403,
        "forbidden",
        f"{principal.kind} {principal.name} lacks permission {permission}",
        permission,
    )
