"""JSON Schemas of the local API's request bodies and query parameters.

They are the contract published in ``/v1/openapi.json`` and they are enforced: every body is
checked against its endpoint's schema before the handler runs (with the task contract's
validator, :func:`mossnode.protocols.tasks.contract.validate`, so only its keyword subset is
used here). Handlers still check what a schema cannot say (names, roles, known ids). Numbers
must be finite doubles; unknown fields are refused rather than ignored, so a typo is an error,
not a silently dropped option.
"""

from __future__ import annotations

from typing import Any

from ..protocols.tasks.confidential import MAX_ROLES
from ..protocols.tasks.model import MAX_ATTEMPTS, MAX_ROUNDS, State

Schema = dict[str, Any]


def obj(props: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    """A closed object: the listed properties only."""
    schema: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def strings(min_items: int = 0, max_items: int = 256) -> Schema:
    schema: Schema = {"type": "array", "items": {"type": "string"}, "maxItems": max_items}
    if min_items:
        schema["minItems"] = min_items
    return schema


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


EMPTY = obj({})
TIMEOUT: Schema = {"type": "number", "exclusiveMinimum": 0, "maximum": 600}
POSITIVE: Schema = {"type": "integer", "minimum": 1, "maximum": 2**53}

INVITE = obj(
    {
        "roles": strings(1, 16),
        "ttl_s": {"type": "number", "minimum": 1, "maximum": 30 * 86400},
    },
    ("roles",),
)
JOIN = obj(
    {
        "addr": {"type": "string", "minLength": 1, "maxLength": 1000},
        "invite": {"type": "string", "minLength": 1, "maxLength": 4096},
        "timeout_s": TIMEOUT,
    },
    ("addr", "invite"),
)
AGENT = obj(
    {
        "name": {"type": "string", "minLength": 1, "maxLength": 63},
        "roles": strings(1, 16),
        "capabilities": strings(0, 64),
        "backend": {"type": "string", "minLength": 1, "maxLength": 4096},
        "max_concurrency": {"type": "integer", "minimum": 1, "maximum": 64},
    },
    ("name", "roles", "backend"),
)
CONTRACT = obj(
    {
        "input_schema": nullable({"type": "object"}),
        "output_schema": nullable({"type": "object"}),
        "deadline_ms": nullable(POSITIVE),
        "max_attempts": nullable({"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPTS}),
        "review_required": nullable({"type": "boolean"}),
        "exclusive": nullable({"type": "boolean"}),
        "max_rounds": nullable({"type": "integer", "minimum": 1, "maximum": MAX_ROUNDS}),
        "cost": nullable({"type": "number"}),
        "budget": nullable({"type": "number"}),
    }
)
CONFIDENTIAL = obj(
    {
        "roles": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 32},
            "minItems": 1,
            "maxItems": MAX_ROLES,
        }
    },
    ("roles",),
)
TASK = obj(
    {
        "title": {"type": "string", "minLength": 1, "maxLength": 500},
        "spec": {"type": "string", "maxLength": 65536},
        "input": {},
        "capabilities": strings(0, 64),
        "after": strings(0, 64),
        "parent": {"type": ["string", "null"], "maxLength": 200},
        "role": {"type": ["string", "null"], "maxLength": 64},
        "priority": {"type": "number"},
        "contract": {**CONTRACT, "type": ["object", "null"]},
        "confidential": {**CONFIDENTIAL, "type": ["object", "null"]},
    },
    ("title",),
)
TEMPLATE = obj(
    {k: v for k, v in TASK["properties"].items() if k not in ("after", "parent", "confidential")},
    ("title",),
)
SCHEDULE = obj(
    {
        "id": {"type": "string", "minLength": 1, "maxLength": 64},
        "interval_ms": {"type": "integer", "minimum": 1000, "maximum": 366 * 86400 * 1000},
        "start_ms": nullable({"type": "integer", "minimum": 0, "maximum": 2**53}),
        "end_ms": nullable({"type": "integer", "minimum": 1, "maximum": 2**53}),
        "task": TEMPLATE,
        "overlap": {"type": "boolean"},
        "timeout_s": TIMEOUT,
    },
    ("id", "interval_ms", "task"),
)
CONTROL = obj({"reason": {"type": "string", "maxLength": 2000}})
VOTE_OPEN = obj(
    {
        "rule": {"type": "string", "enum": ["majority", "reputation"]},
        "title": {"type": "string", "minLength": 1, "maxLength": 200},
        "text": {"type": "string", "maxLength": 4000},
        "timeout_s": TIMEOUT,
    },
    ("title",),
)
VOTE_CAST = obj(
    {"choice": {"type": "string", "enum": ["yes", "no"]}, "timeout_s": TIMEOUT}, ("choice",)
)
VOTE_CLOSE = obj({"timeout_s": TIMEOUT})
ROLE_GRANT = obj(
    {"role": {"type": "string", "minLength": 1, "maxLength": 64}, "timeout_s": TIMEOUT}, ("role",)
)

# Query parameters: the properties of an object whose values arrive as strings.
TASKS_QUERY = obj({"state": {"type": "string", "enum": [s.value for s in State]}})
ACTIVITY_QUERY = obj({"since": {"type": "integer", "minimum": 0, "maximum": 2**53}})

ANY_JSON: Schema = {}  # any JSON value; the messaging core bounds its size and depth
MESSAGE = obj(
    {
        "to": {"type": "string", "minLength": 1, "maxLength": 300},
        "node": nullable({"type": "string", "minLength": 1, "maxLength": 100}),
        "body": ANY_JSON,
        "timeout_s": {"type": "number", "exclusiveMinimum": 0, "maximum": 300},
    },
    ("to", "body"),
)
MESSAGE_BODY = obj({"body": ANY_JSON}, ("body",))
BROADCAST = obj(
    {"role": {"type": "string", "minLength": 1, "maxLength": 64}, "body": ANY_JSON},
    ("role", "body"),
)
MESSAGES_QUERY = obj(
    {
        "after": {"type": "integer", "minimum": 0, "maximum": 2**53},
        "wait_s": {"type": "number", "minimum": 0, "maximum": 300},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
    }
)

TEXT: Schema = {"type": "string", "maxLength": 2000}
PROGRESS = obj(
    {"fraction": nullable({"type": "number", "minimum": 0, "maximum": 1}), "message": TEXT}
)
SUBMIT = obj({"output": ANY_JSON, "error": nullable({"type": "string", "maxLength": 4000})})
REVIEW = obj(
    {
        "score": {"type": "integer", "minimum": 1, "maximum": 5},
        "verdict": {"type": "string", "enum": ["done", "rework"]},
        "comments": TEXT,
    },
    ("score", "verdict"),
)
EVENTS_QUERY = obj(
    {
        "since": {"type": "integer", "minimum": 0, "maximum": 2**63},
        "types": {"type": "string", "maxLength": 200},
    }
)
