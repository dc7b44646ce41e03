"""The swarm's genesis and its decided log: who is a member, with which roles.

The decided log is an append-only sequence of entries ``{seq, kind, payload, certificate}``. A
node replays it from genesis to learn the membership; every entry's certificate is checked by a
:class:`CertificateVerifier`. While the swarm runs on founder authority the certificate is one
``decision.commit`` envelope signed by the founder; the PBFT layer swaps in a verifier of 2f+1
commits without changing the log's shape.

Invites are envelopes signed by an admin member (type ``member.invite``) carrying a nonce, the
roles granted and an expiry; the ``admit`` entry records the nonce, so the log itself makes each
invite single-use on every node.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import cbor2

from ..crypto.envelope import Envelope, Reason, Rejection, canonical, open_envelope, seal
from ..crypto.identity import Identity
from ..crypto.peerid import peer_id_from_public_key, public_key_from_peer_id
from .roles import BUILTIN_ROLES, permissions_of

GENESIS_DOMAIN = b"mossnode/v1/genesis\0"
KINDS = frozenset({"admit", "remove", "grant", "revoke", "pause", "resume"})
ROLE_KINDS = frozenset({"admit", "remove", "grant", "revoke"})  # the kinds that change roles
# Never expires in practice: certificates and invites are judged by their own rules, not skew.
NO_SKEW = 2**62


class MembershipError(Exception):
    """A genesis, entry or invite failed verification; the message says which check."""


@dataclass(frozen=True)
class Genesis:
    name: str
    founder: bytes
    created_at: int
    raw: bytes

    @property
    def swarm_id(self) -> bytes:
        return hashlib.sha256(self.raw).digest()

    @property
    def founder_id(self) -> str:
        return peer_id_from_public_key(self.founder)


def make_genesis(identity: Identity, name: str, now_ms: int) -> Genesis:
    body = {"name": name, "founder": identity.public_key, "created_at": now_ms}
    payload = canonical(body)
    raw = canonical({"body": payload, "sig": identity.sign(GENESIS_DOMAIN + payload)})
    return parse_genesis(raw)


def parse_genesis(raw: bytes) -> Genesis:
    import nacl.bindings
    import nacl.exceptions

    try:
        outer = cbor2.loads(raw)
        body = cbor2.loads(outer["body"])
        name, founder, created = body["name"], body["founder"], body["created_at"]
        sig = outer["sig"]
        if not (isinstance(name, str) and isinstance(founder, bytes) and len(founder) == 32):
            raise TypeError
        nacl.bindings.crypto_sign_open(sig + GENESIS_DOMAIN + outer["body"], founder)
    except nacl.exceptions.BadSignatureError:
        raise MembershipError("genesis signature does not verify") from None
    except Exception:
        raise MembershipError("genesis record is malformed") from None
    return Genesis(name, founder, int(created), raw)


def entry_digest(seq: int, kind: str, payload: Any) -> bytes:
    return hashlib.sha256(canonical([seq, kind, payload])).digest()


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    payload: dict[str, Any]
    certificate: list[bytes]

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "payload": self.payload,
            "certificate": self.certificate,
        }

    @classmethod
    def from_wire(cls, data: Any) -> Entry:
        try:
            seq, kind, payload, cert = (
                data["seq"],
                data["kind"],
                data["payload"],
                data["certificate"],
            )
        except (TypeError, KeyError):
            raise MembershipError("decided-log entry is malformed") from None
        if not (
            type(seq) is int
            and isinstance(kind, str)
            and isinstance(payload, dict)
            and isinstance(cert, list)
            and all(isinstance(c, bytes) for c in cert)
        ):
            raise MembershipError("decided-log entry has fields of the wrong type")
        return cls(seq, kind, payload, cert)


@dataclass
class Member:
    public_key: bytes
    roles: set[str]
    since: int

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)


# (state, entry) -> None if the certificate is good, else the reason it is not.
CertificateVerifier = Callable[["Membership", Entry], "str | None"]


def founder_certificate(
    genesis: Genesis,
    identity: Identity,
    entry_seq: int,
    kind: str,
    payload: dict[str, Any],
    now_ms: int,
) -> list[bytes]:
    """The founder-authority certificate: one commit envelope by the founder."""
    if identity.public_key != genesis.founder:
        raise MembershipError("only the founder decides under founder authority")
    env = seal(
        identity,
        swarm_id=genesis.swarm_id,
        type="decision.commit",
        seq=entry_seq,
        timestamp=now_ms,
        body={"seq": entry_seq, "digest": entry_digest(entry_seq, kind, payload)},
    )
    return [env]


def verify_founder_certificate(state: Membership, entry: Entry) -> str | None:
    if len(entry.certificate) != 1:
        return "founder certificate must hold exactly one commit"
    env = open_envelope(
        entry.certificate[0], swarm_id=state.swarm_id, now_ms=0, max_skew_ms=NO_SKEW
    )
    if isinstance(env, Rejection):
        return f"certificate commit refused ({env})"
    if env.sender != state.genesis.founder or env.type != "decision.commit":
        return "certificate is not the founder's commit"
    body = env.body
    digest = entry_digest(entry.seq, entry.kind, entry.payload)
    if not isinstance(body, dict) or body.get("seq") != entry.seq or body.get("digest") != digest:
        return "certificate does not match the entry"
    return None


@dataclass
class Membership:
    """State derived by replaying the decided log from genesis."""

    genesis: Genesis
    verifier: CertificateVerifier = verify_founder_certificate
    members: dict[bytes, Member] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    used_invites: set[bytes] = field(default_factory=set)
    paused: bool = False
    # history[seq]: every member's roles right after entry ``seq`` (0 = genesis), so writes are
    # judged by the policy they cite, identically on every node.
    history: list[dict[bytes, frozenset[str]]] = field(default_factory=list)
    # author -> [(last update seq still judged by older policy, decision seq)], from removals and
    # revocations: later update seqs must cite at least the decision.
    cutoffs: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.members:
            self.members[self.genesis.founder] = Member(
                self.genesis.founder, {"admin", "validator"}, 0
            )
        self.history.append(self._roles_now())

    def _roles_now(self) -> dict[bytes, frozenset[str]]:
        return {k: frozenset(m.roles) for k, m in self.members.items()}

    @property
    def swarm_id(self) -> bytes:
        return self.genesis.swarm_id

    @property
    def height(self) -> int:
        return len(self.entries)

    def is_member(self, public_key: bytes) -> bool:
        return public_key in self.members

    def roles_of(self, public_key: bytes) -> set[str]:
        m = self.members.get(public_key)
        return set(m.roles) if m else set()

    def may(self, public_key: bytes, permission: str) -> bool:
        m = self.members.get(public_key)
        return m is not None and permission in permissions_of(m.roles)

    def validators(self) -> list[bytes]:
        return sorted(k for k, m in self.members.items() if "validator" in m.roles)

    def by_peer_id(self, peer_id: str) -> Member | None:
        for m in self.members.values():
            if m.peer_id == peer_id:
                return m
        return None

    def authorize(self, sender: bytes, type_: str) -> Rejection | None:
        """Envelope authorizer: only members may send anything on the swarm's topics."""
        if sender not in self.members:
            return Rejection(
                Reason.NOT_MEMBER, f"{peer_id_from_public_key(sender)} is not a member"
            )
        return None

    def check(self, kind: str, payload: dict[str, Any]) -> str | None:
        """Why a proposed entry is invalid in the current state, or None."""
        if kind not in KINDS:
            return f"unknown decision kind {kind!r}"
        if kind in ("pause", "resume"):
            return None
        key = payload.get("public_key")
        if not isinstance(key, bytes) or len(key) != 32:
            return "payload.public_key must be a 32-byte key"
        if kind == "admit":
            roles = payload.get("roles")
            if key in self.members:
                return "already a member"
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                return "payload.roles must be a list of role names"
            unknown = set(roles) - BUILTIN_ROLES
            if unknown:
                return f"unknown role(s): {', '.join(sorted(unknown))}"
            nonce = payload.get("invite")
            if not isinstance(nonce, bytes):
                return "payload.invite must name the invite nonce"
            if nonce in self.used_invites:
                return "invite already used"
            return None
        if key not in self.members:
            return "not a member"
        if kind in ("grant", "revoke"):
            role = payload.get("role")
            if role not in BUILTIN_ROLES:
                return f"unknown role {role!r}"
        if kind == "remove" and key == self.genesis.founder and len(self.members) == 1:
            return "cannot remove the last member"
        cutoff = payload.get("cutoff", 0)
        if kind in ("remove", "revoke") and (type(cutoff) is not int or cutoff < 0):
            return "payload.cutoff must be the author's last accepted update seq (>= 0)"
        return None

    def apply(self, entry: Entry) -> None:
        """Verify and apply the next entry; raises MembershipError and changes nothing if bad."""
        if entry.seq != self.height + 1:
            raise MembershipError(f"entry seq {entry.seq}, expected {self.height + 1}")
        problem = self.check(entry.kind, entry.payload) or self.verifier(self, entry)
        if problem:
            raise MembershipError(f"entry {entry.seq} ({entry.kind}) refused: {problem}")
        p = entry.payload
        if entry.kind == "admit":
            self.members[p["public_key"]] = Member(p["public_key"], set(p["roles"]), entry.seq)
            self.used_invites.add(p["invite"])
        elif entry.kind == "remove":
            del self.members[p["public_key"]]
        elif entry.kind == "grant":
            self.members[p["public_key"]].roles.add(p["role"])
        elif entry.kind == "revoke":
            self.members[p["public_key"]].roles.discard(p["role"])
        elif entry.kind in ("pause", "resume"):
            self.paused = entry.kind == "pause"
        if entry.kind in ("remove", "revoke"):
            cut = (int(p.get("cutoff", 0)), entry.seq)
            self.cutoffs.setdefault(p["public_key"], []).append(cut)
        self.entries.append(entry)
        # Roles change only with ROLE_KINDS; other entries (pause and resume too) share the
        # previous snapshot (snapshots are never mutated), so the history costs memory and a
        # copy of every member's roles only where roles moved, and memos keyed by the snapshot
        # (``validators()``) stay valid.
        self.history.append(self._roles_now() if entry.kind in ROLE_KINDS else self.history[-1])

    def replay(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            self.apply(e)


class MembershipPolicy:
    """The decided log as the CRDT's :class:`~mossnode.protocols.crdt.rules.Policy`.

    Authors are peer ids; rights are read from the roles in force at the cited sequence.
    """

    def __init__(self, state: Membership) -> None:
        self.state = state
        self._keys: dict[str, bytes] = {}
        # (author, policy_seq) -> roles, for seqs the history already holds: those entries
        # never change once appended, so the answer is final.
        self._roles_at: dict[tuple[str, int], frozenset[str] | None] = {}

    def _key(self, author: str) -> bytes | None:
        key = self._keys.get(author)
        if key is None:
            try:
                key = public_key_from_peer_id(author)
            except ValueError:
                return None
            self._keys[author] = key
        return key

    def _roles(self, author: str, policy_seq: int) -> frozenset[str] | None:
        memo = (author, policy_seq)
        if memo in self._roles_at:
            return self._roles_at[memo]
        key = self._key(author)
        history = self.state.history
        if key is None or not 0 <= policy_seq < len(history):
            return None  # not cached: a later seq becomes known when the log advances
        roles = history[policy_seq].get(key)
        if len(self._roles_at) >= 65536:
            self._roles_at.clear()
        self._roles_at[memo] = roles
        return roles

    def latest_seq(self) -> int:
        return self.state.height

    def is_member(self, author: str, policy_seq: int) -> bool:
        return self._roles(author, policy_seq) is not None

    def may(self, author: str, permission: str, policy_seq: int) -> bool:
        roles = self._roles(author, policy_seq)
        return roles is not None and permission in permissions_of(roles)

    def floor(self, author: str, update_seq: int) -> int:
        key = self._key(author)
        cuts = self.state.cutoffs.get(key) if key else None
        if not cuts:
            return 0
        return max((d for c, d in cuts if update_seq > c), default=0)


# --- invites ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Invite:
    nonce: bytes
    roles: list[str]
    expires_at: int
    issuer: bytes
    swarm_id: bytes
    token: str


def make_invite(
    identity: Identity,
    swarm_id: bytes,
    roles: list[str],
    *,
    now_ms: int,
    ttl_ms: int,
    nonce: bytes,
    seq: int,
) -> str:
    unknown = set(roles) - BUILTIN_ROLES
    if unknown:
        raise MembershipError(f"unknown role(s): {', '.join(sorted(unknown))}")
    if not roles:
        raise MembershipError("an invite must grant at least one role")
    body = {"nonce": nonce, "roles": sorted(set(roles)), "expires_at": now_ms + ttl_ms}
    wire = seal(
        identity, swarm_id=swarm_id, type="member.invite", seq=seq, timestamp=now_ms, body=body
    )
    return "moss1" + base64.urlsafe_b64encode(wire).decode().rstrip("=")


def decode_invite(token: str) -> tuple[bytes, bytes]:
    """(wire bytes, swarm_id claimed) of a token, without checking the signature's issuer."""
    if not token.startswith("moss1"):
        raise MembershipError("not a mossnode invite (expected a token starting with moss1)")
    b64 = token[5:]
    try:
        wire = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
        fields = cbor2.loads(wire[64:])
        swarm_id = fields[1]
        if not isinstance(swarm_id, bytes):
            raise TypeError
    except (binascii.Error, ValueError, TypeError, IndexError, KeyError, cbor2.CBORDecodeError):
        raise MembershipError("invite token is corrupted") from None
    except Exception:
        raise MembershipError("invite token is corrupted") from None
    return wire, swarm_id


def check_invite(token: str, state: Membership, now_ms: int) -> Invite:
    """Everything an admitting member checks; raises MembershipError naming the failed check."""
    wire, swarm_id = decode_invite(token)
    if swarm_id != state.swarm_id:
        raise MembershipError("invite is for another swarm")
    env = open_envelope(wire, swarm_id=state.swarm_id, now_ms=now_ms, max_skew_ms=NO_SKEW)
    if isinstance(env, Rejection):
        raise MembershipError(f"invite is forged or damaged ({env.reason.value})")
    return _invite_from(env, state, now_ms, token)


def _invite_from(env: Envelope, state: Membership, now_ms: int, token: str) -> Invite:
    if env.type != "member.invite" or not isinstance(env.body, dict):
        raise MembershipError("token is not an invite")
    if not state.may(env.sender, "member.invite"):
        raise MembershipError("invite was not issued by an admin of this swarm")
    b = env.body
    nonce, roles, expires = b.get("nonce"), b.get("roles"), b.get("expires_at")
    if not isinstance(nonce, bytes) or not isinstance(roles, list) or type(expires) is not int:
        raise MembershipError("invite body is malformed")
    if now_ms > expires:
        raise MembershipError("invite has expired")
    if nonce in state.used_invites:
        raise MembershipError("invite has already been used")
    return Invite(nonce, [str(r) for r in roles], expires, env.sender, env.swarm_id, token)
