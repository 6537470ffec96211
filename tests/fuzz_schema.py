"""Hypothesis strategies from JSON Schema, for fuzzing the gateway's request bodies.

hypothesis-jsonschema 0.23 draws objects through `cu.many(...).more()`,
which Hypothesis 6.170 no longer has (`many` became a context manager), so
every object schema fails there. This covers the part of JSON Schema that
pydantic emits ($ref/$defs, anyOf/oneOf/allOf, enum/const, the scalar types
with their bounds, arrays, objects with required and optional properties),
and leans on purpose towards what breaks servers: hostile strings, huge and
negative numbers, junk keys and missing required fields.
"""

from __future__ import annotations

import string
from typing import Any

from hypothesis import strategies as st

# Values a hostile client tries in any string field.
HOSTILE_STRINGS = (
    "", " ", "\x00", "a\x00b", "\r\nX-Injected: 1", "\ud7ff\ue000", "é" * 3, "😀", "%00", "../../etc/passwd",
    "<script>alert(1)</script>", "' OR 1=1 --", "{{7*7}}", "${jndi:ldap://x}", "hf:packserve/sim-large\x00",
    "A" * 5000, "\\u0000", "null", "NaN", "-1", "1e309",
)
HOSTILE_INTS = (0, -1, 1, 2**31, 2**53 + 1, 10**12, -(10**12), 2**63, 2**64, 10**30)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HOSTILE_INTS),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), st.sampled_from(HOSTILE_STRINGS))
any_json: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)

MAX_DEPTH = 6


def _text(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    lo = int(schema.get("minLength", 0))
    hi = schema.get("maxLength")
    plain = st.text(alphabet=st.characters(codec="utf-8"), min_size=lo, max_size=max(lo, min(int(hi or 40), 40)))
    return st.one_of(plain, st.text(string.ascii_letters, min_size=lo, max_size=max(lo, 12)),
                     st.sampled_from(HOSTILE_STRINGS))


def _number(schema: dict[str, Any], integer: bool) -> st.SearchStrategy[Any]:
    lo = schema.get("minimum", schema.get("exclusiveMinimum"))
    hi = schema.get("maximum", schema.get("exclusiveMaximum"))
    if integer:
        inside: st.SearchStrategy[Any] = st.integers(
            None if lo is None else int(lo) + (1 if "exclusiveMinimum" in schema else 0),
            None if hi is None else int(hi) - (1 if "exclusiveMaximum" in schema else 0))
        return st.one_of(inside, st.sampled_from(HOSTILE_INTS))
    inside = st.floats(lo, hi, allow_nan=False, allow_infinity=False,
                       exclude_min="exclusiveMinimum" in schema, exclude_max="exclusiveMaximum" in schema)
    return st.one_of(inside, st.integers(-5, 5), st.sampled_from((1e308, -1e308, 5e-324)))


class SchemaStrategies:
    """Strategies for one JSON Schema document (its `$defs` resolve `$ref`s)."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root

    def resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.root
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        return dict(node)

    def body(self) -> st.SearchStrategy[Any]:
        """Mostly schema-shaped bodies, some with junk or missing fields, a few arbitrary JSON values."""
        return st.one_of(self.of(self.root, 0), self.of(self.root, 0, mutate=True), any_json)

    def of(self, schema: dict[str, Any] | bool, depth: int, *, mutate: bool = False) -> st.SearchStrategy[Any]:
        if schema is True or schema == {}:
            return any_json
        if schema is False:
            return st.nothing()
        assert isinstance(schema, dict)
        if depth > MAX_DEPTH:
            return json_scalars
        if "$ref" in schema:
            return st.deferred(lambda: self.of(self.resolve(schema["$ref"]), depth + 1, mutate=mutate))
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return st.one_of([self.of(s, depth + 1, mutate=mutate) for s in schema[key]])
        if "allOf" in schema:
            return self.of(schema["allOf"][0], depth + 1, mutate=mutate)
        kind = schema.get("type")
        if isinstance(kind, list):
            return st.one_of([self.of({**schema, "type": k}, depth, mutate=mutate) for k in kind])
        if kind == "string":
            return _text(schema)
        if kind in ("integer", "number"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "array":
            items = schema.get("items", {})
            lo = int(schema.get("minItems", 0))
            hi = max(lo, min(int(schema.get("maxItems", 4)), 4))
            if "prefixItems" in schema:
                return st.tuples(*(self.of(s, depth + 1, mutate=mutate) for s in schema["prefixItems"])).map(list)
            return st.lists(self.of(items, depth + 1, mutate=mutate), min_size=lo, max_size=hi)
        if kind == "object" or "properties" in schema:
            return self._object(schema, depth, mutate)
        return any_json

    def _object(self, schema: dict[str, Any], depth: int, mutate: bool) -> st.SearchStrategy[dict[str, Any]]:
        props: dict[str, Any] = schema.get("properties", {})
        required = [k for k in schema.get("required", []) if k in props]
        optional = {k: self.of(v, depth + 1, mutate=mutate) for k, v in props.items() if k not in required}
        fixed = {k: self.of(props[k], depth + 1, mutate=mutate) for k in required}
        extra = schema.get("additionalProperties")
        base = st.fixed_dictionaries(fixed, optional=optional)
        if isinstance(extra, dict) and extra and not props:
            base = st.dictionaries(st.text(max_size=12), self.of(extra, depth + 1, mutate=mutate), max_size=3)
        if not mutate:
            return base

        def damage(value: dict[str, Any], junk: dict[str, Any], drop: list[str]) -> dict[str, Any]:
            out = {k: v for k, v in value.items() if k not in drop}
            out.update(junk)
            return out

        names = sorted(props) or ["x"]
        return st.builds(damage, base, st.dictionaries(st.sampled_from(names) | st.text(max_size=8), any_json,
                                                       max_size=2),
                         st.lists(st.sampled_from(names), max_size=2))
