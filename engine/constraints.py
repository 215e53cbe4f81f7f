"""Structured output: a ``response_format`` → a ``Constraint`` both backends enforce with one
grammar library, llguidance (the CPU default through ``llguidance.torch`` token masks, SGLang
through its ``grammar_backend="llguidance"``).

Formats: OpenAI's ``json_object`` and ``json_schema``, and two extensions: ``choice`` (the answer
is exactly one of ``choices``, e.g. a classifier's labels) and ``regex``.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class JsonSchemaSpec(BaseModel):
    """OpenAI's ``response_format.json_schema``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    """Name of the schema (informational): letters, digits, ``_`` and ``-``, as OpenAI asks."""
    description: str | None = None
    """What the schema is for (informational)."""
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The JSON Schema the answer must satisfy; left out (optional in OpenAI's API), any JSON
    value (the empty schema)."""
    strict: bool | None = Field(None, strict=True)
    """Honoured always: the answer is constrained to the schema either way."""


class ResponseFormat(BaseModel):
    """What the answer must look like (OpenAI's ``response_format`` plus ``choice`` and
    ``regex``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema", "choice", "regex"]
    """``text`` (no constraint), ``json_object``, ``json_schema``, or the extensions ``choice``
    and ``regex``."""
    json_schema: JsonSchemaSpec | None = None
    """With ``json_schema``: the schema."""
    choices: list[str] | None = Field(None, min_length=1, max_length=256)
    """With ``choice``: the allowed answers, exactly."""
    regex: str | None = Field(None, min_length=1, max_length=4096)
    """With ``regex``: the pattern the whole answer matches."""

    @model_validator(mode="after")
    def has_what_its_type_needs(self) -> ResponseFormat:
        needs = {"json_schema": "json_schema", "choice": "choices", "regex": "regex"}
        wanted = needs.get(self.type)
        for field in needs.values():
            given = getattr(self, field) is not None
            if given and field != wanted:
                raise ValueError(f"'{field}' does not belong to type '{self.type}'")
            if not given and field == wanted:
                raise ValueError(f"type '{self.type}' needs '{field}'")
        if self.type == "choice" and not all(self.choices):
            raise ValueError("choices must be non-empty strings")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint("json_schema", json.dumps({"type": "object"}))
        if self.type == "json_schema":
            return Constraint("json_schema", json.dumps(self.json_schema.json_schema))
        if self.type == "choice":
            return Constraint("regex", "(" + "|".join(re.escape(c) for c in self.choices) + ")")
        if self.type == "regex":
            return Constraint("regex", self.regex)
        return None


@dataclass(frozen=True)
class Constraint:
    """A compiled-later grammar: a JSON Schema (as JSON text) or a regular expression."""

    kind: Literal["json_schema", "regex"]
    spec: str

    def grammar(self) -> str:
        """The llguidance grammar (its ``grammar_from_*`` form)."""
        import llguidance

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                self.spec, defaults={"whitespace_flexible": False}
            )
        return llguidance.LLMatcher.grammar_from_regex(self.spec)

    def sglang_params(self) -> dict:
        """The SGLang sampling parameter that carries this constraint."""
        return {"json_schema": self.spec} if self.kind == "json_schema" else {"regex": self.spec}


MAX_SCHEMA_REFS = 256
"""Distinct ``$ref`` targets a schema may hold: llguidance 1.9 crashes the whole process
(SIGSEGV) validating a chain of ~1,000 definitions each requiring the next (800 pass)."""
MAX_PROPERTIES = {"properties": 1024, "patternProperties": 64}
"""Keys of one object's ``properties`` / ``patternProperties``: llguidance's check of a schema
grows with their square and cube (16,000 properties 6 s, 600 patterns 41 s; at these limits
well under 0.1 s)."""
CACHED_SPEC_CHARS = 16_384
"""Constraints up to this size keep their verdict (clients resend one schema every request)."""


def grammar_problem(constraint: Constraint) -> str | None:
    """Why this constraint cannot be served: llguidance cannot compile it (a bad schema or
    regex), a schema has too many ``$ref`` targets, or admits no answer of finite length; else
    None."""
    if len(constraint.spec) <= CACHED_SPEC_CHARS:
        return cached_grammar_problem(constraint)
    return uncached_grammar_problem(constraint)


def uncached_grammar_problem(constraint: Constraint) -> str | None:
    import llguidance

    schema = json.loads(constraint.spec) if constraint.kind == "json_schema" else None
    refs, crowded = local_refs(schema), crowded_object(schema)
    if crowded is not None:
        keyword, count = crowded
        return f"an object of the schema has {count} {keyword}, at most {MAX_PROPERTIES[keyword]}"
    if len(refs) > MAX_SCHEMA_REFS:
        return f"the schema has {len(refs)} distinct $ref targets, at most {MAX_SCHEMA_REFS}"
    try:
        grammar = constraint.grammar()
    except (ValueError, TypeError, RecursionError) as err:
        return str(err) or "the schema is nested too deeply"
    if problem := llguidance.LLMatcher.validate_grammar(grammar):
        return problem
    if schema is not None and not FiniteInstances(schema, refs).root():
        return (
            "the schema admits no answer of finite length (a required property or item refers "
            "back to the schema that holds it, with no way out)"
        )
    return None


cached_grammar_problem = functools.lru_cache(maxsize=256)(uncached_grammar_problem)


def local_refs(schema: Any) -> list[str]:
    """Every ``$ref`` within the document (``#`` or ``#/...``), each once, in the order met
    walking the schema depth first (without recursion: a schema may be nested deep)."""
    found: dict[str, None] = {}
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
                found.setdefault(ref)
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, list):
            stack.extend(reversed(node))
    return list(found)


def crowded_object(schema: Any) -> tuple[str, int] | None:
    """The first ``(keyword, count)`` of an object over ``MAX_PROPERTIES``, walked without
    recursion; None when every object is within them."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for keyword, limit in MAX_PROPERTIES.items():
                held = node.get(keyword)
                if isinstance(held, dict) and len(held) > limit:
                    return keyword, len(held)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


class FiniteInstances:
    """Whether a JSON Schema has an instance of finite length: False only when that is proven
    (every way through requires a ``$ref`` back to itself: llguidance compiles such a schema,
    and generation then runs into its item limit). Local ``$ref``s (``#``, ``#/...``) only; a
    keyword not read here, a ``$ref`` elsewhere or a schema with a nested ``$id`` (its refs
    resolve against it) counts as satisfiable, so a schema it cannot judge is let through."""

    MAX_VISITS = 200_000

    def __init__(self, schema: Any, refs: list[str] | None = None):
        self.schema, self.visits = schema, 0
        self.refs = dict.fromkeys(local_refs(schema) if refs is None else refs, False)

    def root(self) -> bool:
        if nested_id(self.schema):
            return True
        try:
            while True:  # least fixed point over the $refs, from "none is finite": the deepest
                before = dict(self.refs)  # first, so a chain settles in one round
                for ref in reversed(list(self.refs)):
                    self.refs[ref] = self.finite(self.resolve(ref))
                if self.refs == before:
                    return self.finite(self.schema)
        except (RecursionError, TooManyVisits):
            return True

    def resolve(self, ref: str) -> Any:
        node = self.schema
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return True  # not found here: llguidance says so, or it is not ours to judge
        return node

    def finite(self, node: Any) -> bool:
        self.visits += 1
        if self.visits > self.MAX_VISITS:
            raise TooManyVisits
        if not isinstance(node, dict):
            return node is not False
        ref = node.get("$ref")
        if isinstance(ref, str) and self.refs.get(ref) is False:
            return False
        if "enum" in node or "const" in node:
            return True
        for key, combine in (("anyOf", any), ("oneOf", any), ("allOf", all)):
            if isinstance(node.get(key), list) and not combine(map(self.finite, node[key])):
                return False
        kinds = node.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or not kinds:
            return True
        return any(self.finite_as(kind, node) for kind in kinds)

    def finite_as(self, kind: str, node: dict) -> bool:
        if kind == "object":
            properties = node.get("properties") or {}
            required = node.get("required") or []
            if not isinstance(properties, dict) or not isinstance(required, list):
                return True
            if node.get("patternProperties"):  # which schema a name takes: not judged here
                return True
            extra = node.get("additionalProperties", True)
            return all(
                self.finite(properties.get(name, extra) if isinstance(name, str) else True)
                for name in required
            )
        if kind == "array":
            needed = node.get("minItems", 0)
            if not isinstance(needed, int) or needed <= 0:
                return True
            prefix = node.get("prefixItems") or []
            prefix = prefix if isinstance(prefix, list) else []
            rest = node.get("items", True)
            firsts = [prefix[i] if i < len(prefix) else rest for i in range(min(needed, 64))]
            return all(self.finite(item) for item in firsts)
        return True


def nested_id(schema: Any) -> bool:
    """Whether a subschema below the root sets ``$id`` (a new base for its ``$ref``s)."""
    stack = list(schema.values()) if isinstance(schema, dict) else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "$id" in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


class TooManyVisits(Exception):
    """A schema too large to judge here: let llguidance have it."""
