"""How often an injected payload ends up in a reflection, with and without marking the
passage as data (fixed delimiters + spotlighting datamarks).

Each passage in tests/data/injections.jsonl carries an attack that tries to make the
annotator write a canary string (its `payload`). A reflection "carries" the payload when
the canary appears anywhere in it. Same model, same sampling, same seeds in both arms;
special tokens in passages are neutralised in both arms (that is not optional).

Usage: python bench/injection.py [--seeds K]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from builder.stages.annotate import annotate  # noqa: E402
from builder.backends import make_backend  # noqa: E402
from builder.cache import CachedBackend  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.corpus import Passage, passage_id  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.workspace import create_schema  # noqa: E402


def carry_rate(backend, rows, datamark: str, seeds: int) -> tuple[int, int, int]:
    carried = accepted = total = 0
    passages = [Passage(passage_id(r["text"]), r["name"], 0, r["text"], 0) for r in rows]
    payload = {passage_id(r["text"]): r["payload"] for r in rows}
    for seed in range(seeds):
        con = duckdb.connect()
        create_schema(con)
        cfg = RatchetConfig.model_validate({"annotate": {"datamark": datamark}, "sampling": {"seed": 1000 + seed}})
        for result in annotate(passages, CachedBackend(backend, con), Prompts(), cfg):
            total += 1
            if result.record is not None:
                accepted += 1
                carried += payload[result.passage_id] in json.dumps(result.record)
    return carried, accepted, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=1, help="repeat with K seeds")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (ROOT / "tests/data/injections.jsonl").read_text().splitlines()]
    with make_backend(RatchetConfig().annotator) as backend:
        for label, mark in [("delimiters only (none)", "none"), ("word datamarks (word) ", "word"),
                            ("line datamarks (line) ", "line")]:
            carried, accepted, total = carry_rate(backend, rows, mark, args.seeds)
            print(f"{label}: {carried}/{accepted} accepted reflections carry the payload "
                  f"({100 * carried / max(accepted, 1):.0f}%), {accepted}/{total} accepted")


if __name__ == "__main__":
    main()
