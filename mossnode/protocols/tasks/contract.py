"""JSON Schema subset for task inputs and outputs.

The ``jsonschema`` package is not a dependency, so this validates a documented subset of JSON
Schema (draft 2020-12 semantics for the keywords below) by hand. Every replica must reach the
same verdict on the same output, so the subset is small and exact:

``type`` (string or list of: object, array, string, number, integer, boolean, null),
``properties``, ``required``, ``additionalProperties`` (bool or schema), ``items`` (schema),
``minItems``/``maxItems``, ``enum``, ``const``, ``minimum``/``maximum``,
``exclusiveMinimum``/``exclusiveMaximum`` (numbers), ``minLength``/``maxLength``.
Annotations (``title``, ``description``, ``$schema``, ``$id``, ``$comment``, ``default``,
``examples``) are ignored. Any other keyword makes the schema unsupported: it is refused when
the task is created, so nobody relies on a check that never runs.

An integer-valued float (``3.0``) is an integer, as in JSON Schema; this matters because Yrs
hands every number back as a float.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from mossnode.record import value

TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
ANNOTATIONS = frozenset(
    {"title", "description", "$schema", "$id", "$comment", "default", "examples"}
)
KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
    }
)
MAX_DEPTH = 32


@value
class Violation:
    """Where an instance breaks its schema: a JSONPath-like ``path`` and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"at {self.path}: {self.message}"


def _is_number(v: Any) -> bool:
    """A finite double: an integer too large for one is not a number here (no replica or
    request can make ``float()`` overflow in a check)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def _is_type(v: Any, t: str) -> bool:
    if t == "object":
        return isinstance(v, Mapping)
    if t == "array":
        return isinstance(v, list | tuple)
    if t == "string":
        return isinstance(v, str)
    if t == "number":
        return _is_number(v)
    if t == "integer":
        return _is_number(v) and float(v).is_integer()
    if t == "boolean":
        return isinstance(v, bool)
    return v is None  # null


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: 1 == 1.0, but True != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _child(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{key!r}]"


def check_schema(schema: Any, path: str = "$", depth: int = 0) -> Violation | None:
    """Is ``schema`` inside the supported subset? Returns the first problem, or None.

    Never raises, on any value: replicas run it on schemas read from the shared document."""
    if depth > MAX_DEPTH:
        return Violation(path, "schema nested too deeply")
    if isinstance(schema, bool):
        return None
    if not isinstance(schema, Mapping):
        return Violation(path, "a schema must be an object or a boolean")
    for key in sorted(str(k) for k in schema):
        if key not in KEYWORDS and key not in ANNOTATIONS:
            return Violation(path, f"unsupported schema keyword {key!r}")
    t = schema.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else t
        if (
            not isinstance(names, list | tuple)
            or not names
            or not all(isinstance(n, str) and n in TYPES for n in names)
        ):
            return Violation(path, f"type must be one of {sorted(TYPES)} or a list of them")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, Mapping):
            return Violation(path, "properties must be an object")
        for name in sorted(props, key=str):  # stored data is checked too: never raise
            bad = check_schema(props[name], _child(f"{path}.properties", str(name)), depth + 1)
            if bad:
                return bad
    req = schema.get("required")
    if req is not None and (
        not isinstance(req, list | tuple) or not all(isinstance(r, str) for r in req)
    ):
        return Violation(path, "required must be a list of strings")
    for key in ("additionalProperties", "items"):
        sub = schema.get(key)
        if sub is not None:
            bad = check_schema(sub, f"{path}.{key}", depth + 1)
            if bad:
                return bad
    enum = schema.get("enum")
    if enum is not None and (not isinstance(enum, list | tuple) or not enum):
        return Violation(path, "enum must be a non-empty list")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not _is_number(schema[key]):
            return Violation(path, f"{key} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema:
            v = schema[key]
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or v < 0
                or not float(v).is_integer()
            ):
                return Violation(path, f"{key} must be a non-negative integer")
    return None


def validate(instance: Any, schema: Any, path: str = "$", depth: int = 0) -> Violation | None:
    """First violation of ``instance`` against ``schema`` (None: valid; None schema: anything).

    Keywords are checked in a fixed order and properties in sorted order, so every replica
    reports the same first violation.
    """
    if schema is None or schema is True:
        return None
    if schema is False:
        return Violation(path, "no value is allowed here")
    if not isinstance(schema, Mapping):
        return Violation(path, "schema is not an object")
    if depth > MAX_DEPTH:
        return Violation(path, "value nested too deeply")
    t = schema.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else list(t)
        if not any(_is_type(instance, n) for n in names):
            return Violation(path, f"expected {' or '.join(names)}, got {_type_name(instance)}")
    if "const" in schema and not _json_equal(instance, schema["const"]):
        return Violation(path, f"must equal {schema['const']!r}")
    enum = schema.get("enum")
    if enum is not None and not any(_json_equal(instance, e) for e in enum):
        return Violation(path, f"must be one of {list(enum)!r}")
    if _is_number(instance):
        x = float(instance)
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema and _out_of_range(key, x, float(schema[key])):
                return Violation(path, f"{instance!r} violates {key} {schema[key]!r}")
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            return Violation(path, f"shorter than minLength {schema['minLength']}")
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            return Violation(path, f"longer than maxLength {schema['maxLength']}")
    if isinstance(instance, list | tuple):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            return Violation(path, f"fewer than minItems {schema['minItems']}")
        if "maxItems" in schema and len(instance) > schema["maxItems"]:
            return Violation(path, f"more than maxItems {schema['maxItems']}")
        items = schema.get("items")
        if items is not None:
            for i, item in enumerate(instance):
                bad = validate(item, items, _child(path, i), depth + 1)
                if bad:
                    return bad
    if isinstance(instance, Mapping):
        for name in schema.get("required", ()):
            if name not in instance:
                return Violation(path, f"missing required property {name!r}")
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties", True)
        for key in sorted(str(k) for k in instance):
            sub = props.get(key)
            if sub is not None:
                bad = validate(instance[key], sub, _child(path, key), depth + 1)
            elif extra is False:
                bad = Violation(_child(path, key), "additional property not allowed")
            else:
                bad = validate(instance[key], extra, _child(path, key), depth + 1)
            if bad:
                return bad
    return None


MAX_SAFE_INT = 2**53  # beyond this JSON numbers lose precision; Yrs cannot store them at all
STORE_DEPTH = 24  # nesting the shared document's value encoding (32 levels) always takes


def storable(
    value: Any, path: str = "$", depth: int = 0, max_depth: int = STORE_DEPTH
) -> Violation | None:
    """Can ``value`` go into the shared document as it is? JSON types only, string keys,
    finite numbers, integers within +-2**53, at most ``max_depth`` levels of nesting.
    Checked before anything is written (request bodies, agent outputs): Yrs itself refuses
    or fails hard on such values."""
    if value is None or isinstance(value, bool | str):
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_SAFE_INT else Violation(path, "integer out of range")
    if isinstance(value, float):
        return None if math.isfinite(value) else Violation(path, "number is not finite")
    if not isinstance(value, Mapping | list | tuple):
        return Violation(path, f"{type(value).__name__} is not a JSON value")
    if depth >= max_depth:
        return Violation(path, f"nested more than {max_depth} levels")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                return Violation(path, "object keys must be strings")
            bad = storable(item, _child(path, key), depth + 1, max_depth)
            if bad:
                return bad
        return None
    for i, item in enumerate(value):
        bad = storable(item, _child(path, i), depth + 1, max_depth)
        if bad:
            return bad
    return None


def _out_of_range(key: str, x: float, lim: float) -> bool:
    if key == "minimum":
        return x < lim
    if key == "maximum":
        return x > lim
    if key == "exclusiveMinimum":
        return x <= lim
    return x >= lim


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if _is_number(v):
        return "integer" if float(v).is_integer() else "number"
    if isinstance(v, int | float):
        return "a number out of range"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list | tuple):
        return "array"
    if isinstance(v, Mapping):
        return "object"
    return type(v).__name__
