"""Where commands write by default: a working directory, never the repository's shipped files.

Commands that produce adapters, registries or results write under ``$LORALAND_WORK`` (default
``out/`` in the repository, git-ignored); writing into the repository (``adapters/``,
``adapters.yaml``, ``results/``) is always an explicit flag or path.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def work_dir() -> Path:
    return Path(os.environ.get("LORALAND_WORK", REPO / "out"))
