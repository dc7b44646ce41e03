"""A deterministic network of :class:`ConsensusCore` nodes: fake clock, seeded delays and loss.

Each node keeps what the I/O layer would persist (replica records, client state, the decided
log); a crash drops everything else, a restart rebuilds the state by replaying (and so
verifying) the stored log, exactly as the daemon does. Non-validators and lagging nodes pull
entries from a peer's log every ``pull_ms`` (the service's ``/moss/decided/1``).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

from mossnode.crypto.identity import Identity
from mossnode.protocols.decisions import (
    ConsensusCore,
    ConsensusMembership,
    Output,
    encode_op,
    pbft_config,
)
from mossnode.protocols.membership import Entry, Genesis, make_genesis

T0 = 1_800_000_000_000


def ident(i: int) -> Identity:
    return Identity(bytes([i + 1]) * 32)


@dataclass
class SimNode:
    identity: Identity
    core: ConsensusCore
    records: list[dict[str, Any]] = field(default_factory=list)
    client_state: dict[str, int] | None = None
    log: list[Entry] = field(default_factory=list)
    up: bool = True
    epoch: int = 0
    completed: dict[int, int] = field(default_factory=dict)  # request timestamp -> seq

    @property
    def state(self) -> ConsensusMembership:
        return self.core.state


class ConsensusSim:
    def __init__(
        self,
        seed: int = 0,
        *,
        drop: float = 0.0,
        dup: float = 0.0,
        max_delay: int = 20,
        pull_ms: int = 500,
    ) -> None:
        self.rng = random.Random(seed)
        self.drop = drop
        self.dup = dup
        self.max_delay = max_delay
        self.pull_ms = pull_ms
        self.now = T0
        self.founder = ident(0)
        self.genesis: Genesis = make_genesis(self.founder, "sim", T0)
        self.cfg = pbft_config(self.genesis.swarm_id, view_timeout_ms=800, retransmit_ms=150)
        self.nodes: dict[str, SimNode] = {}
        self._q: list[tuple[int, int, str, str, Any]] = []
        self._ctr = 0
        self.add(self.founder)

    # -- nodes ------------------------------------------------------------------------------

    def fresh_state(self) -> ConsensusMembership:
        return ConsensusMembership(self.genesis)

    def add(self, identity: Identity) -> SimNode:
        core = ConsensusCore(identity, self.fresh_state(), self.cfg, client_retransmit_ms=300)
        node = SimNode(identity, core)
        self.nodes[identity.peer_id] = node
        self.handle(node, core.start(self.now))
        self._push(self.now + self.pull_ms, "pull", identity.peer_id, node.epoch)
        return node

    def crash(self, node: SimNode) -> None:
        node.up = False
        node.epoch += 1

    def restart(self, node: SimNode) -> None:
        """Rebuild from what was persisted only; replaying the log verifies every entry."""
        state = self.fresh_state()
        state.replay(node.log)
        node.core = ConsensusCore(
            node.identity,
            state,
            self.cfg,
            records=node.records,
            client_state=node.client_state,
            client_retransmit_ms=300,
        )
        node.up = True
        self.handle(node, node.core.start(self.now))
        self._push(self.now + self.pull_ms, "pull", node.identity.peer_id, node.epoch)

    # -- events -----------------------------------------------------------------------------

    def _push(self, at: int, kind: str, target: str, payload: Any) -> None:
        self._ctr += 1
        heapq.heappush(self._q, (at, self._ctr, kind, target, payload))

    def handle(self, node: SimNode, out: Output) -> None:
        node.records.extend(out.records)
        if out.client_state is not None:
            node.client_state = dict(out.client_state)
        for e in out.entries:
            assert e.seq == len(node.log) + 1, f"stored {e.seq} after {len(node.log)}"
            node.log.append(e)
        pid = node.identity.peer_id
        for to, data in out.sends:
            if to not in self.nodes or self.rng.random() < self.drop:
                continue
            for _ in range(2 if self.rng.random() < self.dup else 1):
                self._push(self.now + self.rng.randint(1, self.max_delay), "msg", to, data)
        for target, name, at in out.timers:
            self._push(at, "timer", pid, (node.epoch, target, name))
        for t, seq in out.completed:
            node.completed[t] = seq

    def propose(self, node: SimNode, kind: str, payload: dict[str, Any]) -> int:
        t, out = node.core.submit(encode_op(kind, payload), self.now)
        self.handle(node, out)
        return t

    def step(self) -> bool:
        if not self._q:
            return False
        at, _, kind, target, payload = heapq.heappop(self._q)
        self.now = max(self.now, at)
        node = self.nodes[target]
        if not node.up:
            return True
        if kind == "msg":
            self.handle(node, node.core.receive(payload, self.now))
        elif kind == "timer":
            epoch, tgt, name = payload
            if epoch == node.epoch:
                self.handle(node, node.core.on_timer(tgt, name, self.now))
        elif kind == "pull" and payload == node.epoch:
            self._pull(node)
            self._push(self.now + self.pull_ms, "pull", target, node.epoch)
        return True

    def _pull(self, node: SimNode) -> None:
        """Like the service's sync loop: every interval, ask one peer for what follows."""
        core = node.core
        peers = [n for n in self.nodes.values() if n is not node and n.up]
        if not peers:
            return
        peer = self.rng.choice(peers)
        start = core.state.height
        _, out = core.ingest(peer.log[start : start + 32], self.now)
        self.handle(node, out)

    def run(self, ms: int, until: Any = None) -> bool:
        end = self.now + ms
        while self._q and self._q[0][0] <= end:
            self.step()
            if until is not None and until():
                return True
        self.now = max(self.now, end)
        return until() if until is not None else True

    def decided(self, node: SimNode, t: int) -> bool:
        seq = node.completed.get(t)
        return seq is not None and node.state.height >= seq

    # -- checks -----------------------------------------------------------------------------

    def check_logs(self) -> None:
        """Every stored log replays (certificates verified) and all agree on their prefix."""
        logs = [n.log for n in self.nodes.values()]
        for node in self.nodes.values():
            replayed = self.fresh_state()
            replayed.replay(node.log)
            live = node.state
            if node.up and live.height == replayed.height:  # built live == rebuilt from disk
                assert replayed.members == live.members and replayed.history == live.history
                assert replayed.clients == live.clients and replayed.origin == live.origin
                assert replayed.polls == live.polls and replayed.entries == live.entries
        longest = max(logs, key=len)
        for log in logs:
            for a, b in zip(log, longest, strict=False):
                assert (a.seq, a.kind, a.payload) == (b.seq, b.kind, b.payload)
                assert a.certificate[0] == b.certificate[0]
