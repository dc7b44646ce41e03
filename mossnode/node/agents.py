"""This host's registered agents: names, roles, capabilities, backend, and hashed tokens.

Stored in ``agents.json`` in the state dir, rewritten atomically. Tokens are 256-bit random
strings shown once; only their SHA-256 is kept (high-entropy secrets need no slow hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..protocols.roles import BUILTIN_ROLES
from ..protocols.tasks import Limits
from ..protocols.tasks.supervision import CAPABILITY_RE

AGENTS_FILE = "agents.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}\Z")


class AgentError(Exception):
    """Bad agent registration input; the message names the field."""


@dataclass
class Agent:
    name: str
    roles: list[str]
    capabilities: list[str]
    backend: str
    token_sha256: str
    created_at: float
    max_concurrency: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        del d["token_sha256"]
        return d


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_backend(spec: str) -> tuple[str, str]:
    """``exec:COMMAND`` (run here), ``openclaw:AGENT_ID``, or ``api`` (the agent pulls its
    work through the API; openclaw agents do too until a gateway runner exists)."""
    if spec == "api":
        return "api", ""
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("exec", "openclaw", "api") or not arg.strip():
        raise AgentError("backend must be exec:COMMAND, openclaw:AGENT_ID or api")
    return kind, arg.strip()


class AgentRegistry:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / AGENTS_FILE
        self.agents: dict[str, Agent] = {}
        self._by_hash: dict[str, str] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                for a in data.get("agents", []):
                    self.agents[a["name"]] = Agent(**a)
            except (ValueError, TypeError, KeyError) as exc:
                raise AgentError(f"{self.path} is corrupted ({exc}); fix or move it away") from None
        self._reindex()

    def _reindex(self) -> None:
        self._by_hash = {a.token_sha256: a.name for a in self.agents.values()}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"agents": [asdict(a) for a in self.agents.values()]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._reindex()

    def add(
        self,
        name: str,
        roles: list[str],
        capabilities: list[str],
        backend: str,
        max_concurrency: int = 1,
    ) -> tuple[Agent, str]:
        if not NAME_RE.match(name):
            raise AgentError("name must be 1-63 of a-z 0-9 _ . - starting with a letter or digit")
        if name in self.agents:
            raise AgentError(f"agent {name!r} already exists (remove it or rotate its token)")
        if not roles:
            raise AgentError("an agent needs at least one --role")
        unknown = set(roles) - BUILTIN_ROLES
        if unknown:
            raise AgentError(f"unknown role(s): {', '.join(sorted(unknown))}")
        bad = [c for c in capabilities if not CAPABILITY_RE.match(c)]
        if bad:
            raise AgentError(f"bad capability name(s): {', '.join(bad)}")
        parse_backend(backend)
        most = Limits().max_concurrent_per_agent
        if not 1 <= max_concurrency <= most:
            # more would be accepted here and silently never used by the scheduler
            raise AgentError(
                f"max_concurrency must be 1..{most} (the swarm runs at most {most} tasks "
                "per agent at once; register another agent for more)"
            )
        token = "mnt_" + secrets.token_urlsafe(32)
        agent = Agent(
            name,
            sorted(set(roles)),
            sorted(set(capabilities)),
            backend,
            hash_token(token),
            time.time(),
            max_concurrency,
        )
        self.agents[name] = agent
        self._save()
        return agent, token

    def get(self, name: str) -> Agent:
        try:
            return self.agents[name]
        except KeyError:
            raise AgentError(f"no agent named {name!r}") from None

    def remove(self, name: str) -> Agent:
        agent = self.get(name)
        del self.agents[name]
        self._save()
        return agent

    def rotate(self, name: str) -> str:
        agent = self.get(name)
        token = "mnt_" + secrets.token_urlsafe(32)
        agent.token_sha256 = hash_token(token)
        self._save()
        return token

    def by_token(self, token: str) -> Agent | None:
        name = self._by_hash.get(hash_token(token))
        return self.agents.get(name) if name else None
