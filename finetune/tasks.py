"""The five tasks: prompt template (as adapters.yaml and the app show it), parser, metric."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from functools import cached_property

from engine.constraints import ResponseFormat

from .sql import chinook_db, execution_match


@dataclass(frozen=True)
class Task:
    name: str
    category: str
    description: str
    template: str
    metric: str
    max_tokens: int
    labels: tuple[str, ...] = ()

    def prompt(self, fields: dict[str, str]) -> str:
        return self.template.format(**fields)

    def parse(self, output: str) -> str:
        """Classification: the label the output names first; generation: the output itself."""
        if not self.labels:
            return output.strip()
        text = output.lower()
        found = [(text.find(label), label) for label in self.labels if label in text]
        return min(found)[1] if found else ""

    def score(self, output: str, target: str) -> dict[str, float]:
        return {"accuracy": float(self.parse(output) == target)}

    def response_format(self) -> ResponseFormat | None:
        """The answer's shape as a constraint: a classifier's labels (``--constrain``)."""
        return ResponseFormat(type="choice", choices=list(self.labels)) if self.labels else None


class AddressTask(Task):
    def parse(self, output: str) -> str:
        match = re.search(r"\{.*?\}", output, re.DOTALL)
        return match.group(0) if match else ""

    def score(self, output: str, target: str) -> dict[str, float]:
        want = json.loads(target)
        try:
            got = json.loads(self.parse(output))
            got = {str(k): str(v) for k, v in got.items()} if isinstance(got, dict) else {}
        except json.JSONDecodeError:
            got = {}
        return {"exact_match": float(got == want), "field_f1": field_f1(got, want)}

    def response_format(self) -> ResponseFormat:
        """A JSON object of usaddress fields (those the training data uses), string values."""
        return ResponseFormat(
            type="json_schema",
            json_schema={"name": "us_address", "strict": True, "schema": address_schema()},
        )


class SqlTask(Task):
    def parse(self, output: str) -> str:
        text = re.sub(r"```(?:sql)?", "", output, flags=re.IGNORECASE)
        match = re.search(r"\bselect\b.*", text, re.IGNORECASE | re.DOTALL)
        return match.group(0).split(";")[0].strip() if match else ""

    @cached_property
    def db(self):
        return chinook_db()

    def score(self, output: str, target: str) -> dict[str, float]:
        return {"execution_accuracy": float(execution_match(self.db, self.parse(output), target))}


@functools.cache
def address_schema() -> dict:
    """The usaddress fields the training data uses, as string properties, in the order the
    answers give them (mean relative position): a grammar fixes the order of an object's keys,
    and alphabetical order would force the model off the order it learned."""
    from .data import load_split

    positions: dict[str, list[float]] = {}
    for example in load_split("address", "train"):
        keys = list(json.loads(example["target"]))
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i / max(1, len(keys) - 1))
    fields = sorted(positions, key=lambda k: sum(positions[k]) / len(positions[k]))
    return {
        "type": "object",
        "properties": {f: {"type": "string"} for f in fields},
        "additionalProperties": False,
    }


def field_f1(got: dict[str, str], want: dict[str, str]) -> float:
    """F1 over (field, value) pairs."""
    if not got and not want:
        return 1.0
    hits = len(set(got.items()) & set(want.items()))
    if hits == 0:
        return 0.0
    precision, recall = hits / len(got), hits / len(want)
    return 2 * precision * recall / (precision + recall)


TASKS = {
    task.name: task
    for task in [
        Task(
            "sentiment",
            "classification",
            "Rotten Tomatoes critic snippet → fresh or rotten.",
            "Is this movie review snippet fresh (positive) or rotten (negative)? "
            "Answer fresh or rotten.\n\nReview: {review}",
            "accuracy",
            16,
            ("fresh", "rotten"),
        ),
        Task(
            "news",
            "classification",
            "BBC news article → business, entertainment, politics, sport or tech.",
            "Which topic is this BBC news article about: business, entertainment, politics, "
            "sport or tech? Answer with the topic.\n\n{article}",
            "accuracy",
            16,
            ("business", "entertainment", "politics", "sport", "tech"),
        ),
        Task(
            "spam",
            "classification",
            "SMS message → spam or ham (not spam).",
            "Is this SMS message spam or ham (a normal message)? Answer spam or ham.\n\n"
            "Message: {message}",
            "accuracy",
            16,
            ("spam", "ham"),
        ),
        AddressTask(
            "address",
            "extraction",
            "US address → JSON object of its usaddress fields (AddressNumber, StreetName, ...).",
            "Parse this US address into a JSON object of its parts, using the usaddress field "
            "names (AddressNumber, StreetNamePreDirectional, StreetName, StreetNamePostType, "
            "OccupancyType, OccupancyIdentifier, PlaceName, StateName, ZipCode, ...).\n\n"
            "Address: {address}",
            "exact_match",
            128,
        ),
        SqlTask(
            "sql",
            "text-to-sql",
            "Question about the Chinook music store → a SQLite query, scored by running it.",
            "Write one SQLite query that answers this question about the Chinook music store "
            "database (tables artist, album, track, genre, customer, employee, invoice, ...).\n\n"
            "Question: {question}",
            "execution_accuracy",
            128,
        ),
    ]
}
