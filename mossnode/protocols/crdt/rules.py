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

from .schema import CORE_FIELDS, ELEMENT, SUB_MAPS, Path, render, task_creator
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


RULES: tuple[Rule, ...] = (
    _rule("tasks/{task}", "creator", TASK_CREATE, TASK_DELETE, MAP, once=True),
    _rule("tasks/{task}/{core}", "creator", TASK_CREATE, TASK_CREATE, VALUE),
    _rule("tasks/{task}/{sub}", "creator", TASK_CREATE, None, MAP, once=True),
    _rule("tasks/{task}/claims/{node}", "node", TASK_CLAIM, TASK_CLAIM, VALUE),
    _rule("tasks/{task}/bids/{node}", "node", TASK_CLAIM, TASK_CLAIM, VALUE),
    _rule("tasks/{task}/leases/{node}", "node", TASK_CLAIM, TASK_CLAIM, VALUE),
    _rule("tasks/{task}/progress/{node}", "node", TASK_PROGRESS, TASK_PROGRESS, VALUE),
    _rule("tasks/{task}/results/{node}", "node", TASK_SUBMIT, TASK_SUBMIT, VALUE),
    _rule("tasks/{task}/reviews/{node}", "node", TASK_REVIEW, TASK_REVIEW, VALUE),
    _rule("tasks/{task}/log/{node}", "node", MEMBER, None, ARRAY, once=True),
    _rule("tasks/{task}/log/{node}/[]", "node", MEMBER, None, VALUE),
    _rule("agents/{node}", "node", MEMBER, MEMBER, MAP),
    _rule("agents/{node}/**", "node", MEMBER, MEMBER, TREE),
    _rule("history/{node}", "node", MEMBER, None, ARRAY, once=True),
    _rule("history/{node}/[]", "node", MEMBER, None, VALUE),
)

_CORE = frozenset(CORE_FIELDS)
_SUB = frozenset(SUB_MAPS)


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
        if pat == "{core}":
            if seg not in _CORE:
                return None
        elif pat == "{sub}":
            if seg not in _SUB:
                return None
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
# A pattern tells path segments apart only by: None or not, membership in CORE_FIELDS or
# SUB_MAPS, and equality with its literal segments. So every other string behaves alike, and a
# path's *shape* (those strings replaced by "") matches the same row at the same positions as
# the path itself. Authorization looks rows up by shape, once per shape, and reads the owner
# from the real path at the row's {task} or {node} position.

_LITERALS = frozenset(
    seg
    for rule in RULES
    for seg in rule.pattern
    if not seg.startswith("{") and seg not in ("[]", "**")
)
_SPECIAL = _LITERALS | _CORE | _SUB
if "" in _SPECIAL:
    raise AssertionError("the shape placeholder must not be a pattern segment")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A row found for a shape, and where in the path its owner is named."""

    rule: Rule
    owner_at: int  # index of the {node} or {task} segment
    creator: bool  # the owner is the creator named in the task id at owner_at
    kinds: tuple[Content, ...]  # rule.kinds, tested by identity (Enum hashing is slow)


def shape_seg(seg: str | None) -> str | None:
    return seg if seg is None or seg in _SPECIAL else ""


def shape(path: Path) -> Path:
    return tuple(seg if seg is None or seg in _SPECIAL else "" for seg in path)


def resolve(path_shape: Path, rules: tuple[Rule, ...] = RULES) -> Resolved | None:
    """The row for every path of this shape, or None if no row matches."""
    found = find_rule(path_shape, rules)
    if found is None:
        return None
    rule = found[0]
    slot = "{node}" if rule.owner == "node" else "{task}"
    return Resolved(rule, rule.pattern.index(slot), rule.owner == "creator", tuple(rule.kinds))


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
    seg = path[res.owner_at]
    if seg is None or (task_creator(seg) if res.creator else seg) != author:
        return False
    permission = res.rule.write if op is Op.WRITE else res.rule.delete
    if permission is None:
        return False
    if permission != MEMBER:
        ok = may.get(permission)
        if ok is None:
            ok = may[permission] = policy.may(author, permission, policy_seq)
        if not ok:
            return False
    return not (op is Op.WRITE and content is not None and content not in res.kinds)
