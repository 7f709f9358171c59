"""JSON schemas -> bounded schemas whose every answer fits a token budget, for llguidance.

A reply constrained by a schema must end within `max_tokens` for any weights: random weights at
temperature 1 pick almost uniformly among the allowed tokens, so an unbounded string, digit run,
array or map never ends by chance. So before llguidance compiles a schema, `fit_schema` makes its
language finite and measures it:

* compact JSON (no whitespace, "," and ":" separators), no `\\uXXXX` escapes;
* what the schema leaves unbounded gets a bound (`Caps`): `maxLength` on strings (also those with a
  `pattern` or `format`), `maxItems` on arrays, a range on integers, a range and `multipleOf
  10**-digits` on numbers, and objects get `additionalProperties: false` (a schema that is only a
  map, `additionalProperties: {...}` without `properties`, keeps it with bounded keys and count);
  a value of any type (`{}`, untyped) is a bounded JSON value of limited depth;
* the answer's worst case in bytes is computed from those bounds (a string of n characters takes
  at most 4n + 2 bytes: UTF-8 or a two-byte escape per character). Every token of the answer holds
  at least one byte, so bytes bound tokens.

`fit_schema` tries `LEVELS` from the most generous down and keeps the first whose worst case fits
the budget: level 0 keeps the schema's own bounds and adds defaults; later levels also cap the
schema's own `maxLength` / `maxItems` / ranges; the last level keeps only the shortest choice
(required properties, `minItems` items, the shortest enum member or `anyOf` branch). Every level
narrows the schema's language, never widens it: each answer still validates against the original
schema. When even the last level does not fit, `fit_schema` raises `SchemaError` with the budget
the schema needs.

Supported keywords (others raise `SchemaError` naming them, never a silently unconstrained reply):
type (one or a list), enum, const, anyOf, oneOf (where llguidance proves the branches disjoint),
allOf (merged when the parts do not overlap), local $ref / $defs / definitions (not recursive);
strings: minLength, maxLength, pattern, format; numbers: minimum, maximum, exclusiveMinimum,
exclusiveMaximum, multipleOf; arrays: items, prefixItems, minItems, maxItems; objects: properties,
required, additionalProperties. Annotations (title, description, default, examples, ...) and `x-`
keys are ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import json
import math
from typing import Any

__all__ = ["SchemaError", "Caps", "LEVELS", "JSON_OPTIONS", "FittedSchema", "normalize_schema", "bound_schema",
           "fit_schema", "json_bytes"]

# llguidance's JSON options: compact, and no \uXXXX escapes (6 bytes for one character). Control
# characters without a short escape cannot be written; everything else can.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":",
                "json_allowed_escapes": 'nrbtf\\"'}
BYTES_PER_CHAR = 4  # UTF-8, or a two-byte escape
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly", "$schema", "$id", "$anchor", "contentEncoding", "contentMediaType"})
VALIDATION = {
    None: frozenset({"type", "enum", "const", "anyOf", "oneOf"}),
    "string": frozenset({"minLength", "maxLength", "pattern", "format"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "array": frozenset({"items", "prefixItems", "minItems", "maxItems"}),
    "object": frozenset({"properties", "required", "additionalProperties"}),
}
VALIDATION["integer"] = VALIDATION["number"]
TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
# Strings of these formats get at least this many characters (the longest usual spelling) whatever
# the level, so that the cap never empties the format.
FORMAT_FLOOR = {"date": 10, "time": 32, "date-time": 40, "duration": 32, "email": 64, "hostname": 64, "ipv4": 15,
                "ipv6": 45, "uuid": 36, "uri": 128}


class SchemaError(ValueError):
    """A schema that cannot be enforced: an unsupported feature (named), or one whose answers
    cannot fit the token budget."""


@dataclasses.dataclass(frozen=True)
class Caps:
    """Bounds for what a schema leaves open (and, unless `keep_explicit`, caps on what it sets)."""

    string: int  # characters of a string
    items: int  # items of an array
    int_digits: int  # integers (and the integer part of numbers) within +-(10**int_digits - 1)
    frac_digits: int  # decimals of a number without multipleOf
    props: int  # entries of a map (additionalProperties without properties)
    depth: int  # nesting of a value of any type
    keep_explicit: bool = False  # keep the schema's own maxLength / maxItems / ranges
    minimal: bool = False  # keep only the shortest choice


LEVELS = (
    Caps(256, 16, 15, 6, 8, 2, keep_explicit=True),
    Caps(128, 16, 12, 6, 8, 2),
    Caps(64, 8, 9, 4, 4, 1),
    Caps(32, 4, 6, 3, 4, 1),
    Caps(16, 4, 4, 2, 2, 1),
    Caps(8, 2, 3, 2, 2, 0),
    Caps(4, 1, 2, 1, 1, 0),
    Caps(0, 0, 1, 0, 0, 0, minimal=True),
)


def json_bytes(value) -> int:
    """An upper bound on the bytes of `value` written as compact JSON by the grammar (strings 4
    bytes a character, numbers two bytes of slack for sign and decimal point)."""
    if isinstance(value, str):
        return 2 + BYTES_PER_CHAR * len(value)
    if isinstance(value, bool) or value is None:
        return len(json.dumps(value))
    if isinstance(value, (int, float)):
        return len(json.dumps(value)) + 2
    if isinstance(value, list):
        return 2 + sum(json_bytes(v) for v in value) + max(0, len(value) - 1)
    if isinstance(value, dict):
        return 2 + sum(_key_bytes(k) + 1 + json_bytes(v) for k, v in value.items()) + max(0, len(value) - 1)
    raise SchemaError(f"not a JSON value: {value!r}")


def _key_bytes(key: str) -> int:
    """Bytes of a declared property name: exact for printable ASCII without escapes."""
    if all(32 <= ord(c) < 127 and c not in '"\\' for c in key):
        return len(key) + 2
    return 2 + 6 * len(key)


# ---------------------------------------------------------------------------------------------
# Normalization: refs inlined, annotations dropped, one type per node, unsupported keywords refused
# ---------------------------------------------------------------------------------------------
def normalize_schema(schema: Any) -> dict:
    """The schema with local $refs inlined, `allOf` merged, type lists split into `anyOf`,
    annotations dropped; raises SchemaError naming an unsupported feature and where it is."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise SchemaError(f"the schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise SchemaError(f"a JSON schema is an object (or a boolean), got {type(schema).__name__}")
    return _Normalizer(schema).node(schema, "#", ())


class _Normalizer:
    def __init__(self, root):
        self.root = root

    def resolve(self, ref: str, path: str):
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaError(f"$ref {ref!r} at {path}: only local references ('#/$defs/...') are supported")
        target = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"$ref {ref!r} at {path} points to nothing")
            target = target[part]
        return target

    def node(self, s, path: str, refs: tuple) -> dict:
        if s is True:
            return {}
        if s is False:
            raise SchemaError(f"the schema at {path} is `false`: no value is valid")
        if not isinstance(s, dict):
            raise SchemaError(f"the schema at {path} must be an object, got {type(s).__name__}")
        s = {k: v for k, v in s.items() if k not in ANNOTATIONS and not k.startswith("x-")
             and k not in ("$defs", "definitions")}
        if "$ref" in s:
            ref = s.pop("$ref")
            if ref in refs:
                raise SchemaError(f"recursive $ref {ref!r} at {path} is not supported (answers would be unbounded)")
            target = self.node(self.resolve(ref, path), ref, refs + (ref,))
            s = _merge(target, self.node(s, path, refs), path) if s else target
            return s
        if "allOf" in s:
            parts = s.pop("allOf")
            if not isinstance(parts, list) or not parts:
                raise SchemaError(f"'allOf' at {path} must be a non-empty array")
            out = self.node(s, path, refs)
            for i, p in enumerate(parts):
                out = _merge(out, self.node(p, f"{path}/allOf/{i}", refs), path)
            return out
        t = s.get("type")
        if isinstance(t, list):
            if not t or any(x not in TYPES for x in t):
                raise SchemaError(f"'type' at {path} must name JSON types, got {t!r}")
            if len(t) > 1:
                if "anyOf" in s or "oneOf" in s:
                    raise SchemaError(f"a list of types with anyOf/oneOf at {path} is not supported")
                rest = {k: v for k, v in s.items() if k != "type"}
                return {"anyOf": [self.node({**rest, "type": x}, path, refs) for x in t]}
            s["type"] = t = t[0]
        if t is not None and t not in TYPES:
            raise SchemaError(f"unknown type {t!r} at {path}")
        if t is None:
            t = _infer_type(s)
            if t is not None:
                s["type"] = t
        allowed = VALIDATION[None] | (VALIDATION.get(t) or frozenset())
        for k in s:
            if k not in allowed:
                if t is None and any(k in VALIDATION[x] for x in VALIDATION if x):
                    raise SchemaError(f"keywords of several types without 'type' at {path} ({k!r}): give a type")
                raise SchemaError(f"unsupported JSON schema keyword {k!r} at {path}")
        for key in ("anyOf", "oneOf"):
            if key in s:
                if not isinstance(s[key], list) or not s[key]:
                    raise SchemaError(f"'{key}' at {path} must be a non-empty array")
                s[key] = [self.node(b, f"{path}/{key}/{i}", refs) for i, b in enumerate(s[key])]
        if "enum" in s and (not isinstance(s["enum"], list) or not s["enum"]):
            raise SchemaError(f"'enum' at {path} must be a non-empty array")
        if t == "array":
            if "items" in s and s["items"] is not False:
                s["items"] = self.node(s["items"], f"{path}/items", refs)
            if "prefixItems" in s:
                if not isinstance(s["prefixItems"], list):
                    raise SchemaError(f"'prefixItems' at {path} must be an array")
                s["prefixItems"] = [self.node(b, f"{path}/prefixItems/{i}", refs) for i, b in enumerate(s["prefixItems"])]
        if t == "object":
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise SchemaError(f"'properties' at {path} must be an object")
            s["properties"] = {k: self.node(v, f"{path}/properties/{k}", refs) for k, v in props.items()}
            req = s.get("required", [])
            if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
                raise SchemaError(f"'required' at {path} must be an array of names")
            extra = s.get("additionalProperties", True)
            if extra is not True and extra is not False:
                s["additionalProperties"] = self.node(extra, f"{path}/additionalProperties", refs)
        for k in ("minLength", "maxLength", "minItems", "maxItems"):
            if k in s and (not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 0):
                raise SchemaError(f"'{k}' at {path} must be a non-negative integer, got {s[k]!r}")
        for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if k in s and (not isinstance(s[k], (int, float)) or isinstance(s[k], bool) or not math.isfinite(s[k])):
                raise SchemaError(f"'{k}' at {path} must be a number, got {s[k]!r}")
        if "multipleOf" in s and s["multipleOf"] <= 0:
            raise SchemaError(f"'multipleOf' at {path} must be > 0")
        return s


def _infer_type(s: dict) -> str | None:
    """The type whose keywords an untyped schema uses (None: no type keywords)."""
    kinds = {t for t in ("string", "number", "array", "object") for k in s if k in VALIDATION[t]}
    return kinds.pop() if len(kinds) == 1 else None


def _merge(a: dict, b: dict, path: str) -> dict:
    """allOf / $ref siblings as one schema, when they do not constrain the same keyword."""
    both = {k for k in a.keys() & b.keys() if a[k] != b[k]}
    if both:
        raise SchemaError(f"allOf / $ref with overlapping keywords {sorted(both)} at {path} is not supported")
    return {**a, **b}


# ---------------------------------------------------------------------------------------------
# Bounding: one level of caps -> (schema for llguidance, min bytes, max bytes)
# ---------------------------------------------------------------------------------------------
def bound_schema(node: dict, caps: Caps) -> tuple[dict, int, int]:
    """A normalized schema bounded by `caps`: (schema, shortest answer bytes, longest answer bytes)."""
    if "enum" in node or "const" in node:
        values = node["enum"] if "enum" in node else [node["const"]]
        sizes = [json_bytes(v) for v in values]
        out = {k: v for k, v in node.items() if k != "const"}
        if caps.minimal:
            values = [values[sizes.index(min(sizes))]]
        out["enum"] = list(values)
        return out, min(sizes), max(json_bytes(v) for v in values)
    for key in ("anyOf", "oneOf"):
        if key in node:
            branches = [bound_schema(b, caps) for b in node[key]]
            if caps.minimal and key == "anyOf":
                branches = [min(branches, key=lambda b: b[2])]
            rest = {k: v for k, v in node.items() if k != key}
            out = {**rest, "anyOf": [b[0] for b in branches]} if len(branches) > 1 else {**rest, **branches[0][0]}
            return out, min(b[1] for b in branches), max(b[2] for b in branches)
    t = node.get("type")
    if t is None:
        return _any_value(caps, caps.depth)
    return _BOUNDERS[t](node, caps)


def _null(node, caps):
    return dict(node), 4, 4


def _boolean(node, caps):
    return dict(node), 4, 5


def _cap(explicit, default: int, caps: Caps) -> int:
    if explicit is None:
        return default
    return int(explicit) if caps.keep_explicit else min(int(explicit), default)


def _string(node, caps):
    out = dict(node)
    lo = node.get("minLength", 0)
    floor, rx_max = lo, math.inf
    if "format" in node:
        floor = max(floor, FORMAT_FLOOR.get(node["format"], 0))
    if "pattern" in node:
        rx_min, rx_max = regex_width(node["pattern"])
        floor = max(floor, rx_min)
    hi = max(_cap(node.get("maxLength"), caps.string, caps), floor)
    if "maxLength" in node:
        hi = min(hi, node["maxLength"])  # never beyond the schema's own bound
    out["maxLength"] = hi
    return out, 2 + lo, 2 + BYTES_PER_CHAR * int(min(hi, rx_max))


def regex_width(pattern: str) -> tuple[int, float]:
    """(min, max) characters a regex matches (Python's parser; (0, inf) when it cannot tell)."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
        lo, hi = sre_parse.parse(pattern).getwidth()
    except Exception:  # ECMA-262 syntax Python does not read
        return 0, math.inf
    return lo, (math.inf if hi >= sre_parse.MAXREPEAT else hi)


def _digits(x) -> int:
    return len(str(int(abs(x))))


def _range(node, caps: Caps, integer: bool):
    """(lo, hi) of a number node after bounding; exclusive ends count as the bound itself."""
    width = 10 ** caps.int_digits - 1
    span = max(width, node.get("multipleOf", 1))  # wide enough to hold a multiple
    lows = [node[k] for k in ("minimum", "exclusiveMinimum") if k in node]
    highs = [node[k] for k in ("maximum", "exclusiveMaximum") if k in node]
    lo, hi = (max(lows) if lows else None), (min(highs) if highs else None)
    if lo is None:
        lo = -width if hi is None or hi >= -width else hi - span
    if hi is None:
        hi = width if lo <= width else lo + span
    if not caps.keep_explicit:  # narrow the schema's own range, keeping what it allows near 0
        if lo <= 0 <= hi:
            lo, hi = max(lo, -span), min(hi, span)
        elif lo > 0:
            hi = min(hi, lo + span)
        else:
            lo = max(lo, hi - span)
    if integer:
        lo, hi = math.ceil(lo), math.floor(hi)
    return lo, hi


def _set_range(out, node, lo, hi):
    """Write the bounded range, keeping exclusive ends where they are tighter."""
    for key, value, excl, tighter in (("minimum", lo, "exclusiveMinimum", lambda a, b: a >= b),
                                      ("maximum", hi, "exclusiveMaximum", lambda a, b: a <= b)):
        if excl in node and tighter(node[excl], value):
            out.pop(key, None)
            out[excl] = node[excl]
        else:
            out.pop(excl, None)
            out[key] = value


def _integer(node, caps):
    out = dict(node)
    lo, hi = _range(node, caps, integer=True)
    _set_range(out, node, lo, hi)
    worst = max(len(str(int(lo))), len(str(int(hi))))
    best = 1 if lo <= 0 <= hi else min(len(str(int(lo))), len(str(int(hi))))
    return out, best, worst


def _decimals(x) -> int:
    d = decimal.Decimal(repr(x)).normalize()
    return max(0, -d.as_tuple().exponent)


def _number(node, caps):
    out = dict(node)
    lo, hi = _range(node, caps, integer=False)
    _set_range(out, node, lo, hi)
    if "multipleOf" in node:
        frac = _decimals(node["multipleOf"])
    else:
        frac = caps.frac_digits
        out["multipleOf"] = float(f"1e-{frac}") if frac else 1
    sign = 1 if lo < 0 else 0
    worst = sign + max(_digits(lo), _digits(hi)) + 1 + max(frac, 1)
    return out, 1, worst


def _array(node, caps):
    out = dict(node)
    prefix = [bound_schema(p, caps) for p in node.get("prefixItems", [])]
    item = node.get("items", {})
    lo = node.get("minItems", 0)
    hi = max(_cap(node.get("maxItems"), caps.items, caps), lo)
    if "maxItems" in node:
        hi = min(hi, node["maxItems"])
    if item is False:
        hi = min(hi, len(prefix))
        rest = None
    else:
        rest = bound_schema(item, caps)
        out["items"] = rest[0]
    if caps.minimal:
        hi = lo
    if prefix:
        out["prefixItems"] = [p[0] for p in prefix]
    out["minItems"], out["maxItems"] = lo, hi

    def size(n, pick):
        parts = [pick(prefix[i]) if i < len(prefix) else pick(rest) for i in range(n)]
        return 2 + sum(parts) + max(0, n - 1)
    return out, size(lo, lambda b: b[1]), size(hi, lambda b: b[2])


def _object(node, caps):
    props = dict(node.get("properties", {}))
    required = list(dict.fromkeys(node.get("required", [])))
    extra = node.get("additionalProperties", True)
    for r in required:  # required names outside `properties` take the additionalProperties schema
        if r not in props:
            if extra is False:
                raise SchemaError(f"property {r!r} is required but additionalProperties is false")
            props[r] = {} if extra is True else extra
    if caps.minimal:
        props = {k: v for k, v in props.items() if k in required}
    bounded = {k: bound_schema(v, caps) for k, v in props.items()}
    out = {k: v for k, v in node.items() if k not in ("properties", "required", "additionalProperties")}
    out["type"] = "object"
    out["properties"] = {k: b[0] for k, b in bounded.items()}
    if required:
        out["required"] = required
    lo = 2 + sum(_key_bytes(k) + 1 + bounded[k][1] for k in required) + max(0, len(required) - 1)
    hi_n = len(bounded)
    hi = 2 + sum(_key_bytes(k) + 1 + b[2] for k, b in bounded.items())
    out["additionalProperties"] = False
    if not props and extra is not False:  # a map: bounded keys, bounded count
        value = _any_value(caps, caps.depth) if extra is True else bound_schema(extra, caps)
        n = 0 if caps.minimal else caps.props
        key_chars = max(1, caps.string // 8) if caps.string else 0
        out.pop("properties")
        out["patternProperties"] = {f"^.{{0,{key_chars}}}$": value[0]}
        out["maxProperties"] = n
        hi += n * (2 + BYTES_PER_CHAR * key_chars + 1 + value[2])
        hi_n += n
    return out, lo, hi + max(0, hi_n - 1)


def _any_value(caps: Caps, depth: int) -> tuple[dict, int, int]:
    """A JSON value of any type, bounded: scalars, and arrays / maps of depth - 1 while depth > 0."""
    kinds = [{"type": "null"}, {"type": "boolean"}, {"type": "integer"}, {"type": "number"}, {"type": "string"}]
    branches = [bound_schema(k, caps) for k in kinds]
    if depth > 0:  # containers of values one level less deep
        inner = dataclasses.replace(caps, depth=depth - 1)
        branches += [bound_schema(k, inner) for k in ({"type": "array"}, {"type": "object"})]
    if caps.minimal:
        branches = [min(branches, key=lambda b: b[2])]
    schema = {"anyOf": [b[0] for b in branches]} if len(branches) > 1 else branches[0][0]
    return schema, min(b[1] for b in branches), max(b[2] for b in branches)


_BOUNDERS = {"null": _null, "boolean": _boolean, "integer": _integer, "number": _number, "string": _string,
             "array": _array, "object": _object}


# ---------------------------------------------------------------------------------------------
# Fitting a budget
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FittedSchema:
    schema: dict  # what llguidance compiles (with the JSON options)
    min_bytes: int  # the shortest answer (a lower bound)
    max_bytes: int  # the longest answer: its tokens are at most this many
    level: int  # index into LEVELS


def fit_schema(schema: Any, budget: int, *, minimal: bool = False) -> FittedSchema:
    """The most generous level of `LEVELS` whose longest answer takes at most `budget` tokens
    (`minimal`: the last level only). Raises SchemaError when the schema is not supported or even
    its shortest answers do not fit."""
    node = normalize_schema(schema)
    last = None
    first = len(LEVELS) - 1 if minimal else 0
    for i, caps in enumerate(LEVELS[first:], first):
        bounded, lo, hi = bound_schema(copy.deepcopy(node), caps)
        last = (bounded, lo, hi)
        if hi <= budget:
            return FittedSchema({**bounded, "x-guidance": dict(JSON_OPTIONS)}, lo, hi, i)
    raise SchemaError(f"the answer needs up to {last[2]} tokens even at its shortest (this schema's minimum "
                      f"is about {last[1]}), but only {budget} are left for it: raise max_tokens")


def compact_schema_text(schema: Any) -> str:
    """The schema as compact JSON (what the developer message shows the model)."""
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))

