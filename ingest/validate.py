"""Every payload the ingest stores is checked first: the published JSON Schema of its topic
(docs/schemas/v1, installed as ``iortd.schemas``; ``$ref``s inlined once at start), then
what a schema cannot say (a skip's ``first <= last``). With ``validate = "envelope"``
(ingest/config.py) the streams' bodies are not walked, only their envelope (what the
bookkeeping reads: ``schema``, ``session``, ``seq``, ``ts``, ``sim``, ``historical``),
checked in Python: about 190 µs less a message on the project's VM, which is what lets one
ingest keep up with 100 rooms there (docs/ingest.md); ``skip`` and ``status`` are always
checked whole. A message that fails is counted
against its room and dropped: it never reaches the store or another room's bookkeeping.
The reason kept is the failing keyword and path, never the sender's text.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import Mapping
from typing import Any

from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

__all__ = ["STEMS", "Validators"]

STEMS: Mapping[str, str] = {
    "status": "status",
    "telemetry": "telemetry",
    "applicator": "applicator",
    "events": "events",
    "skip": "skip",
}


def _inline(node: Any, defs: Mapping[str, Any], depth: int = 0) -> Any:
    if depth > 32:
        raise ValueError("recursive $ref in a published schema")
    if isinstance(node, dict):
        if "$ref" in node:
            target = _inline(defs[str(node["$ref"]).removeprefix("#/$defs/")], defs, depth + 1)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {"allOf": [target, _inline(rest, defs, depth + 1)]} if rest else target
        return {k: _inline(v, defs, depth) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs, depth) for v in node]
    return node


_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_U64 = 2**64 - 1


def envelope_problem(name: str, p: Any) -> str | None:
    """What the JSON Schema says of the envelope, checked by hand."""
    if not isinstance(p, dict) or p.get("schema") != "iort/v1":
        return f"{name}: envelope schema"
    for key, lo in (("session", 1), ("seq", 0)):
        v = p.get(key)
        if type(v) is not int or not lo <= v <= _U64:
            return f"{name}: envelope {key}"
    if not isinstance(p.get("ts"), str) or not _TS.fullmatch(p["ts"]):
        return f"{name}: envelope ts"
    if type(p.get("sim")) is not bool or type(p.get("historical")) is not bool:
        return f"{name}: envelope sim/historical"
    return None


class Validators:
    def __init__(self, *, bodies: bool = True) -> None:
        self.bodies = bodies
        root = importlib.resources.files("iortd.schemas") / "v1"
        self._v: dict[str, Any] = {}
        for name, stem in STEMS.items():
            schema = json.loads((root / f"{stem}.schema.json").read_text("utf-8"))
            self._v[name] = Draft202012Validator(_inline(schema, schema.get("$defs", {})))

    def problem(self, name: str, payload: Any) -> str | None:
        """Why ``payload`` is not a valid ``name`` message, bounded; None when it is."""
        v = self._v.get(name)
        if v is None:
            return "not a topic the ingest reads"
        if not self.bodies and name not in ("skip", "status"):
            return envelope_problem(name, payload)
        err = next(iter(v.iter_errors(payload)), None)
        if err is not None:
            path = "/".join(str(p) for p in err.absolute_path)[:60]
            return f"{name}: {err.validator} at /{path}"
        if name == "skip" and payload["skipped"]["first"] > payload["skipped"]["last"]:
            return "skip: first > last"
        return None
