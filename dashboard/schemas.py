"""Every payload checked against the published JSON Schemas (docs/schemas/v1), on the server.

The browser only ever sees what passed: a boolean dose, an interlock state of ``1`` or a
field the schema does not know never reaches a page (issue 13). The schema files are the
very ones the documentation links to, installed as package data (``iortd.schemas``); one
validator per topic is built once, at start (jsonschema 4.26, Draft 2020-12). The
``date-time`` format is not asserted separately: every timestamp in v1 also carries a
``pattern`` (RFC 3339, microseconds, ``Z``), which is.

Speed, measured (benchmarks/dashboard_validation.py): jsonschema walks the
schema for every message, and resolving ``$ref`` is half of that. So, once at load, local
``$ref``s are inlined (v1 has no recursive definitions; a cycle is refused), and the
``events`` schema, a ``oneOf`` of one branch per ``kind``, is split so that a message is
checked against its own kind's branch only (equivalent, since the branches' ``kind``s are
disjoint, which is checked at load; otherwise the whole ``oneOf`` is kept). A test keeps
the result equal to the published schema's verdict on valid and broken payloads.

A failure is reduced to a short, bounded *reason* (the topic, the JSON path of the first
error with array indices folded, and the keyword that failed), never the offending value:
the reason is a counter key and a log field, so a publisher must not be able to write
into either.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from jsonschema.exceptions import best_match  # type: ignore[import-untyped]

__all__ = ["STEMS", "Check", "build", "published", "schema_error", "validators"]

# topic name -> schema file stem
STEMS = {
    "status": "status",
    "telemetry": "telemetry",
    "applicator": "applicator",
    "interlocks": "interlocks",
    "delivery": "delivery",
    "events": "events",
    "audit/checkpoint": "checkpoint",
    "alarms": "alarms",
    "skip": "skip",
}
_REASON_MAX = 80


_INLINE_DEPTH = 32


def published(name: str) -> dict[str, Any]:
    """The published schema of topic ``name``, as installed."""
    root = importlib.resources.files("iortd.schemas") / "v1"
    schema: dict[str, Any] = json.loads((root / f"{STEMS[name]}.schema.json").read_text("utf-8"))
    return schema


def _inline(node: Any, defs: Mapping[str, Any], depth: int = 0) -> Any:
    if depth > _INLINE_DEPTH:
        raise ValueError("recursive $ref in a published schema: cannot inline")
    if isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            if not isinstance(ref, str) or not ref.startswith("#/$defs/"):
                raise ValueError(f"$ref {ref!r}: only local #/$defs/ references are inlined")
            target = _inline(defs[ref.removeprefix("#/$defs/")], defs, depth + 1)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {"allOf": [target, _inline(rest, defs, depth + 1)]} if rest else target
        return {k: _inline(v, defs, depth) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs, depth) for v in node]
    return node


@dataclass(frozen=True, slots=True)
class Check:
    """A topic's validator; for a ``oneOf`` by ``kind``, one validator per kind."""

    whole: Any
    by_kind: Mapping[str, Any] | None

    def validator_for(self, payload: object) -> Any:
        if self.by_kind is not None and isinstance(payload, dict):
            kind = payload.get("kind")
            if isinstance(kind, str) and kind in self.by_kind:
                return self.by_kind[kind]
        return self.whole


def _kinds(branch: Any) -> list[str] | None:
    kind = branch.get("properties", {}).get("kind", {}) if isinstance(branch, dict) else {}
    if "const" in kind and isinstance(kind["const"], str):
        return [kind["const"]]
    if isinstance(kind.get("enum"), list) and all(isinstance(k, str) for k in kind["enum"]):
        return list(kind["enum"])
    return None


def build(schema: dict[str, Any]) -> Check:
    Draft202012Validator.check_schema(schema)
    flat = _inline(schema, schema.get("$defs", {}))
    whole = Draft202012Validator(flat)
    branches = flat.get("oneOf")
    if not isinstance(branches, list):
        return Check(whole, None)
    base = {k: v for k, v in flat.items() if k != "oneOf"}
    by_kind: dict[str, Any] = {}
    for branch in branches:
        kinds = _kinds(branch)
        if kinds is None or any(k in by_kind for k in kinds):
            return Check(whole, None)  # not disjoint by kind: keep the whole oneOf
        v = Draft202012Validator({**base, "allOf": [*base.get("allOf", []), branch]})
        by_kind.update(dict.fromkeys(kinds, v))
    return Check(whole, by_kind)


@cache
def validators() -> Mapping[str, Check]:
    """One validator per topic name, built once per process."""
    return {name: build(published(name)) for name in STEMS}


def schema_error(name: str, payload: object) -> str | None:
    """None if ``payload`` is valid for topic ``name``; else a short reason such as
    ``schema telemetry /dose_primary_gy: type``."""
    validator = validators()[name].validator_for(payload)
    if validator.is_valid(payload):
        return None
    err = best_match(validator.iter_errors(payload))
    path = "/" + "/".join("[]" if isinstance(p, int) else str(p)[:24] for p in err.absolute_path)
    return f"schema {name} {path}: {err.validator}"[:_REASON_MAX]
