"""Structured output: a ``response_format`` → a ``Constraint`` both backends enforce with one
grammar library, llguidance (the CPU default through ``llguidance.torch`` token masks, SGLang
through its ``grammar_backend="llguidance"``).

Formats: OpenAI's ``json_object`` and ``json_schema``, and two extensions: ``choice`` (the answer
is exactly one of ``choices``, e.g. a classifier's labels) and ``regex``.
"""

from __future__ import annotations

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
    json_schema: dict[str, Any] = Field(alias="schema")
    """The JSON Schema the answer must satisfy."""
    strict: bool | None = None
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


def grammar_problem(constraint: Constraint) -> str | None:
    """Why llguidance cannot compile this constraint (a bad schema or regex), or None."""
    import llguidance

    try:
        grammar = constraint.grammar()
    except (ValueError, TypeError) as err:
        return str(err)
    return llguidance.LLMatcher.validate_grammar(grammar) or None
