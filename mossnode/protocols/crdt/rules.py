"""Owner rules: who may write or delete each path of the shared document.

One table, read top to bottom, first match wins; a path no row matches is writable by nobody.
A row names the owner (the ``{node}`` segment of the path, or the creator embedded in the
``{task}`` id), the permission the owner's policy must grant to write and to delete, which
content kinds may be written there, and whether the path may be written only once. Everything a
row needs is in the path, the author and the policy the update cites, so every honest replica
reaches the same verdict.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

from .schema import CORE, ELEMENT, KEY_SEP, LOG, Path, node_key, render, task_creator
from .yrs_update import Content


class Policy(Protocol):
    """The decided log's view of rights; a pure function of its arguments.

    ``latest_seq``: highest decided sequence this node holds (updates citing a later one wait).
    ``floor``: lowest policy sequence an author's update number ``update_seq`` may cite; a
    revocation or narrowing decision records a cut-off and raises the floor above it, so a
    revoked author cannot backdate its writes to an older, kinder policy.
    """

    def latest_seq(self) -> int: ...

    def is_member(self, author: str, policy_seq: int) -> bool: ...

    def may(self, author: str, permission: str, policy_seq: int) -> bool: ...

    def floor(self, author: str, update_seq: int) -> int: ...


class Op(enum.Enum):
    WRITE = "write"
    DELETE = "delete"


MEMBER = "member"  # a "permission" that membership alone grants
TASK_CREATE = "task.create"
TASK_DELETE = "task.delete"
TASK_CLAIM = "task.claim"
TASK_PROGRESS = "task.progress"
TASK_SUBMIT = "task.submit"
TASK_REVIEW = "task.review"

Owner = Literal["creator", "node"]

_DEL = Content.DELETED  # an item its own transaction already deleted: harmless anywhere writable
VALUE = frozenset({Content.VALUE, _DEL})
MAP = frozenset({Content.MAP, _DEL})
ARRAY = frozenset({Content.ARRAY, _DEL})
TREE = frozenset({Content.VALUE, Content.MAP, Content.ARRAY, _DEL})


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: tuple[str, ...]
    owner: Owner
    write: str | None  # permission to write; None: nobody
    delete: str | None  # permission to delete; None: nobody (only a deleted ancestor takes it)
    kinds: frozenset[Content]
    once: bool = False

    def __str__(self) -> str:
        return "/".join(self.pattern)


def _rule(
    pattern: str,
    owner: Owner,
    write: str | None,
    delete: str | None,
    kinds: frozenset[Content],
    once: bool = False,
) -> Rule:
    return Rule(tuple(pattern.split("/")), owner, write, delete, kinds, once)


def _entry(
    kind: str,
    write: str | None,
    delete: str | None,
    kinds: frozenset[Content],
    once: bool = False,
    tail: tuple[str, ...] = (),
) -> Rule:
    """A row for node entries of a task: the one segment ``<kind>/<node>`` (a key of the task
    map, see :mod:`.schema`), owned by the node it names."""
    return Rule(
        ("tasks", "{task}", node_key(kind, "{node}"), *tail), "node", write, delete, kinds, once
    )


RULES: tuple[Rule, ...] = (
    _rule("tasks/{task}", "creator", TASK_CREATE, TASK_DELETE, MAP, once=True),
    _rule(f"tasks/{{task}}/{CORE}", "creator", TASK_CREATE, TASK_CREATE, VALUE),
    _entry("claims", TASK_CLAIM, TASK_CLAIM, VALUE),
    _entry("bids", TASK_CLAIM, TASK_CLAIM, VALUE),
    _entry("leases", TASK_CLAIM, TASK_CLAIM, VALUE),
    _entry("progress", TASK_PROGRESS, TASK_PROGRESS, VALUE),
    _entry("results", TASK_SUBMIT, TASK_SUBMIT, VALUE),
    _entry("reviews", TASK_REVIEW, TASK_REVIEW, VALUE),
    _entry(LOG, MEMBER, None, ARRAY, once=True),
    _entry(LOG, MEMBER, None, VALUE, tail=("[]",)),
    _rule("agents/{node}", "node", MEMBER, MEMBER, MAP),
    _rule("agents/{node}/**", "node", MEMBER, MEMBER, TREE),
    _rule("history/{node}", "node", MEMBER, None, ARRAY, once=True),
    _rule("history/{node}/[]", "node", MEMBER, None, VALUE),
)

# compound segments: a literal prefix ending in KEY_SEP, then a binder ("claims/{node}")
_PREFIXES = frozenset(
    seg[: seg.index(KEY_SEP) + 1] for rule in RULES for seg in rule.pattern if KEY_SEP in seg
)


def _compound(pat: str) -> tuple[str, str] | None:
    """``(prefix, binder)`` of a compound pattern segment, else None."""
    i = pat.find(KEY_SEP)
    return None if i < 0 else (pat[: i + 1], pat[i + 2 : -1])


def _match(pattern: tuple[str, ...], path: Path) -> dict[str, str] | None:
    bound: dict[str, str] = {}
    for i, pat in enumerate(pattern):
        if pat == "**":
            return bound if len(path) > i else None
        if i >= len(path):
            return None
        seg = path[i]
        if pat == "[]":
            if seg is not ELEMENT:
                return None
            continue
        if seg is None:
            return None
        compound = _compound(pat)
        if compound is not None:
            prefix, binder = compound
            if not seg.startswith(prefix):
                return None
            bound[binder] = seg[len(prefix) :]
        elif pat.startswith("{"):
            bound[pat[1:-1]] = seg
        elif pat != seg:
            return None
    return bound if len(path) == len(pattern) else None


def find_rule(path: Path, rules: tuple[Rule, ...] = RULES) -> tuple[Rule, Mapping[str, str]] | None:
    for rule in rules:
        if not path or rule.pattern[0] != path[0]:
            continue
        bound = _match(rule.pattern, path)
        if bound is not None:
            return rule, bound
    return None


def owner_of(rule: Rule, bound: Mapping[str, str]) -> str | None:
    if rule.owner == "node":
        return bound.get("node")
    return task_creator(bound.get("task", ""))


def judge(
    author: str,
    path: Path,
    op: Op,
    content: Content | None,
    policy: Policy,
    policy_seq: int,
    rules: tuple[Rule, ...] = RULES,
) -> tuple[Rule | None, str | None]:
    """Decide one change. Returns the matched rule and None, or a refusal detail.

    ``content`` is None when the caller cannot see it (a pycrdt event); the kind check is then
    left to the structural pass, which always sees it.
    """
    where = render(path)
    found = find_rule(path, rules)
    if found is None:
        return None, f"no rule allows {op.value} at {where}"
    rule, bound = found
    if owner_of(rule, bound) != author:
        return rule, f"{op.value} at {where} belongs to its owner ({rule})"
    permission = rule.write if op is Op.WRITE else rule.delete
    if permission is None:
        return rule, f"nobody may {op.value} at {where} ({rule})"
    if permission != MEMBER and not policy.may(author, permission, policy_seq):
        return rule, f"{permission} not granted at policy {policy_seq} for {where}"
    if op is Op.WRITE and content is not None and content not in rule.kinds:
        return rule, f"{content.value} content not allowed at {where}"
    return rule, None


# -- the table by path shape ------------------------------------------------------------------
#
# A pattern tells path segments apart only by: None or not, equality with its literal segments,
# and the literal prefix of a compound segment ("claims/" of "claims/{node}"). So every other
# string behaves alike, and a path's *shape* (a compound segment cut to its prefix, every other
# string replaced by "") matches the same row at the same positions as the path itself.
# Authorization looks rows up by shape, once per shape, and reads the owner from the real path
# at the row's {task} or {node} position (after the compound prefix).

_LITERALS = frozenset(
    seg for rule in RULES for seg in rule.pattern if "{" not in seg and seg not in ("[]", "**")
)
_SPECIAL = _LITERALS
if "" in _SPECIAL or any(KEY_SEP in seg for seg in _SPECIAL):
    raise AssertionError("the shape placeholder and compound prefixes must not be literals")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A row found for a shape, and where in the path its owner is named."""

    rule: Rule
    owner_at: int  # index of the segment naming the owner ({task}, {node} or <kind>/{node})
    creator: bool  # the owner is the creator named in the task id at owner_at
    kinds: tuple[Content, ...]  # rule.kinds, tested by identity (Enum hashing is slow)
    strip: int = 0  # length of the compound prefix before the owner's id in that segment


def shape_seg(seg: str | None) -> str | None:
    if seg is None or seg in _SPECIAL:
        return seg
    i = seg.find(KEY_SEP)
    if i > 0:
        prefix = seg[: i + 1]
        if prefix in _PREFIXES:
            return prefix
    return ""


def shape(path: Path) -> Path:
    return tuple([seg if seg is None or seg in _SPECIAL else shape_seg(seg) for seg in path])


def owner_seg(res: Resolved, seg: str | None) -> str | None:
    """The owner's id from the path segment at ``res.owner_at``."""
    if seg is None:
        return None
    if res.creator:
        return task_creator(seg)
    return seg[res.strip :] if res.strip else seg


def resolve(path_shape: Path, rules: tuple[Rule, ...] = RULES) -> Resolved | None:
    """The row for every path of this shape, or None if no row matches."""
    found = find_rule(path_shape, rules)
    if found is None:
        return None
    rule = found[0]
    slot = "{node}" if rule.owner == "node" else "{task}"
    at = next(i for i, seg in enumerate(rule.pattern) if seg.endswith(slot))
    strip = len(rule.pattern[at]) - len(slot)
    return Resolved(rule, at, rule.owner == "creator", tuple(rule.kinds), strip)


_BY_SHAPE: dict[Path, Resolved | None] = {}
_NOT_YET: object = object()


def permits(
    author: str,
    path: Path,
    op: Op,
    content: Content | None,
    policy: Policy,
    policy_seq: int,
    may: dict[str, bool],
) -> bool:
    """True only where :func:`judge` allows (a fast "yes"; ask :func:`judge` on False).
    ``may`` memoizes ``policy.may`` for this author and policy seq."""
    path_shape = shape(path)
    res = _BY_SHAPE.get(path_shape, _NOT_YET)
    if res is _NOT_YET:
        if len(_BY_SHAPE) > 4096:
            _BY_SHAPE.clear()
        res = _BY_SHAPE[path_shape] = resolve(path_shape)
    if res is None:
        return False
    assert isinstance(res, Resolved)
    if owner_seg(res, path[res.owner_at]) != author:
        return False
    permission = res.rule.write if op is Op.WRITE else res.rule.delete
    if permission is None:
        return False
    if permission != MEMBER and not granted(author, permission, policy, policy_seq, may):
        return False
    return not (op is Op.WRITE and content is not None and content not in res.kinds)


def granted(
    author: str, permission: str, policy: Policy, policy_seq: int, may: dict[str, bool]
) -> bool:
    """``policy.may(author, permission, policy_seq)``, memoized in ``may`` (one author and
    policy seq per dict): the rules ask it for every item an update writes."""
    ok = may.get(permission)
    if ok is None:
        ok = may[permission] = policy.may(author, permission, policy_seq)
    return ok
