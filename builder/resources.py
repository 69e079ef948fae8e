"""Paths of the files that ship beside the package (schemas, prompts, cards, examples)."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = ROOT / "schemas"
PROMPTS_DIR = ROOT / "prompts"
CARDS_DIR = ROOT / "dataset_cards"
EXAMPLES_DIR = ROOT / "examples"
# Claims the default writer wrote, each labelled by a person against its passage (bench/data/README.md):
# what `ratchet validity` measures critics on unless told otherwise.
LABELLED_CLAIMS = ROOT / "bench" / "data" / "demo-claims.labelled.jsonl"


@lru_cache
def load_schema(name: str) -> dict:
    return json.loads((SCHEMAS_DIR / f"{name}.schema.json").read_text(encoding="utf-8"))
