"""Structured output's checks before generation: a schema with no answer of finite length is
refused on both backends (``grammar_problem``), and a grammar that fails during generation ends
its request with a 400-kind error naming ``response_format`` (real llguidance, SmolLM2's
tokenizer)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from engine.backends.sample import Grammars
from engine.constraints import Constraint, FiniteInstances, grammar_problem
from engine.interface import InvalidRequestError

NODE = {"type": "object", "properties": {"v": {"type": "integer"}}}


def defs(node: dict) -> dict:
    return {"$ref": "#/$defs/n", "$defs": {"n": node}}


FINITE = {
    "a tree": defs({**NODE, "properties": {**NODE["properties"], "kids": {"type": "array",
                    "items": {"$ref": "#/$defs/n"}}}, "required": ["v", "kids"]}),
    "a list ending in null": defs({"type": "object", "properties": {"next": {"anyOf": [
        {"$ref": "#/$defs/n"}, {"type": "null"}]}}, "required": ["next"]}),
    "an optional self": {"type": "object", "properties": {"me": {"$ref": "#"}}},
    "a self or a string": {"type": ["object", "string"], "properties": {"me": {"$ref": "#"}},
                           "required": ["me"]},
    "an empty array of selves": {"type": "array", "items": {"$ref": "#"}},
    "a plain object": {"type": "object"},
    "a required name a pattern gives": {"type": "object", "patternProperties": {"^a$": {
        "type": "string"}}, "required": ["a"], "additionalProperties": False},
    "refs below a nested $id": {"$ref": "#/$defs/A", "$defs": {
        "A": {"$id": "http://x/a", "$defs": {"B": {"type": "string"}}, "type": "object",
              "properties": {"p": {"$ref": "#/$defs/B"}}, "required": ["p"]},
        "B": {"type": "object", "properties": {"q": {"$ref": "#/$defs/B"}}, "required": ["q"]}}},
    "a long chain that ends": {"$ref": "#/$defs/d0", "$defs": {
        **{f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}},
                     "required": ["x"]} for i in range(200)}, "d200": {"type": "string"}}},
}  # fmt: skip
ENDLESS = {
    "a required self": {"type": "object", "properties": {"me": {"$ref": "#"}}, "required": ["me"]},
    "a required self through $defs": defs({"type": "object", "properties": {"x": {
        "$ref": "#/$defs/n"}}, "required": ["x"]}),
    "at least one item, each a self": {"type": "array", "minItems": 1, "items": {"$ref": "#"}},
    "two defs requiring each other": {"$ref": "#/$defs/a", "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"type": "array", "minItems": 2, "items": {"$ref": "#/$defs/a"}}}},
    "only itself": defs({"$ref": "#/$defs/n"}),
}  # fmt: skip


@pytest.mark.parametrize("name", FINITE)
def test_a_schema_with_a_finite_answer_passes(name):
    assert FiniteInstances(FINITE[name]).root()
    assert grammar_problem(Constraint("json_schema", json.dumps(FINITE[name]))) is None


@pytest.mark.parametrize("name", ENDLESS)
def test_a_schema_whose_every_answer_is_endless_is_refused(name):
    assert not FiniteInstances(ENDLESS[name]).root()
    problem = grammar_problem(Constraint("json_schema", json.dumps(ENDLESS[name])))
    assert problem is not None and "finite" in problem


def test_a_schema_with_too_many_refs_is_refused_before_the_grammar_compiler():
    """llguidance 1.9 crashes the process (SIGSEGV) on a chain of ~1,000 definitions."""
    chain = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}},
                       "required": ["x"]} for i in range(1000)}  # fmt: skip
    schema = {"$ref": "#/$defs/d0", "$defs": {**chain, "d1000": {"type": "string"}}}
    problem = grammar_problem(Constraint("json_schema", json.dumps(schema)))
    assert problem == "the schema has 1001 distinct $ref targets, at most 256"


@pytest.mark.parametrize(("keyword", "limit"), [("properties", 1024), ("patternProperties", 64)])
def test_an_object_of_more_properties_than_llguidance_checks_quickly_is_refused(keyword, limit):
    """Its check grows with their square (cube for patterns): 16,000 properties took 6 s."""

    def schema(count: int) -> dict:
        pattern = "^p{}[a-z]*$" if keyword == "patternProperties" else "p{}"
        names = [pattern.format(i) for i in range(count)]
        inner = {"type": "object", keyword: {n: {"type": "string"} for n in names}}
        return {"type": "object", "properties": {"inner": inner}}

    assert grammar_problem(Constraint("json_schema", json.dumps(schema(limit)))) is None
    problem = grammar_problem(Constraint("json_schema", json.dumps(schema(limit + 1))))
    assert f"{limit + 1} {keyword}, at most {limit}" in problem


def test_a_long_chain_settles_in_a_few_rounds():
    judge = FiniteInstances(FINITE["a long chain that ends"])
    assert judge.root() and judge.visits < 5 * 201 * 4


def test_a_schema_too_large_to_judge_is_let_through():
    names = [f"p{i}" for i in range(1000)]
    endless = {"type": "object", "properties": {**dict.fromkeys(names, NODE), "me": {"$ref": "#"}},
               "required": [*names, "me"]}  # fmt: skip
    assert not FiniteInstances(endless).root()
    judge = FiniteInstances(endless)
    judge.MAX_VISITS = 500
    assert judge.root()  # gave up: llguidance and its limits have the last word


def test_a_grammar_failing_during_generation_names_response_format(base_dir):
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    grammar = Grammars(tokenizer, len(tokenizer)).compile(Constraint("regex", "(yes|no)"))
    grammar.accept(tokenizer.encode("yes")[0])
    with pytest.raises(InvalidRequestError, match="grammar failed during generation") as failed:
        grammar.accept(tokenizer.encode("no")[0])
    assert failed.value.param == "response_format" and "\n" not in str(failed.value)


def test_a_json_schema_without_its_schema_is_any_json_value(base_dir):
    """``schema`` is optional in OpenAI's API (found refused by a hostile-input pass): left out,
    the answer is any JSON value, and the grammar takes numbers, strings, objects."""
    from engine.constraints import ResponseFormat

    nameless = ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"name": "x"}})
    constraint = nameless.constraint()
    assert constraint == Constraint("json_schema", "{}")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    grammars = Grammars(tokenizer, len(tokenizer))
    for answer in ("42", '"yes"', '{"a":[1,2]}'):
        grammar = grammars.compile(constraint)
        for token in tokenizer.encode(answer):
            grammar.accept(token)  # raises where the grammar refuses it
        assert grammar.matcher.is_accepting(), answer
    with pytest.raises(InvalidRequestError, match="grammar failed"):
        grammars.compile(constraint).accept(tokenizer.encode("yes")[0])  # not JSON
