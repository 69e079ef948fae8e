"""Can the grounding judge hold the notes and the prose to their passage, sentence by sentence?

The claims of a kept reflection are right in 85% of the demo's audited reflections; the whole
reflection (claims, notes and prose) in 28%. What fails is in the notes and the prose. This bench
asks the grounding judge (`builder/judges.py: EntailmentTask`, the claim judge's question) of
every note and prose sentence the rules keep, and measures it against a person's label:

  data    bench/data/demo-notes.labelled.jsonl: the 345 note and prose sentences of the 91 kept
          reflections of four audited demo builds, each labelled by a reader (bench/data/README.md)
  rules   builder/faithfulness.py: unborne (and check_note), as the gate runs them today, and as
          before the copy and praise rules (6b31ca8)
  judge   each --models model, asked of every sentence the rules keep; P(unsupported)

It prints the judge's AUC on the sentences the rules keep, and what cutting every sentence at or
above a threshold would leave: reflections kept (one whose prose loses every sentence is vetoed,
as the gate does), reflections whose every kept sentence is supported, supported sentences lost;
and what the build does by default ("as built": notes and prose cut at 0.5, a reflection whose
every sentence the judge cut rebuilt from its claims' quotes, said as the passage's).
Answers are cached in bench/results/note_judge.duckdb, so a rerun is free.

    .venv/bin/python bench/note_judge.py [--models qwen2.5-coder-1.5b,...]

Writes bench/results/note_judge.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from builder import faithfulness  # noqa: E402
from builder.backends import registry  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.evaluate import cached_engine  # noqa: E402
from builder.judges import EntailmentTask  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.base import run_task  # noqa: E402
from builder.stats import binary_scores  # noqa: E402
from builder.workspace import create_schema  # noqa: E402

DATA = ROOT / "bench" / "data" / "demo-notes.labelled.jsonl"
RESULTS = ROOT / "bench" / "results"
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def load() -> list[dict]:
    return [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]


def before_2026_12_07(row: dict, notice: frozenset[str]) -> str | None:
    """Why the rules of 6b31ca8 cut this sentence: today's, without the copy and praise rules."""
    with mock.patch.object(faithfulness, "vouches", lambda sentence: None):
        return (faithfulness.unborne(row["text"], row["passage"], notice, note=row["field"] != "reflection")
                or faithfulness.check_note(row["text"], row["passage"]))


def rule_of(row: dict, notice: frozenset[str]) -> str | None:
    """Why today's rules cut this sentence (None: kept), as the gate does for its field. A
    sentence of the reflection copied from the passage is given back as the passage's, said to be
    the passage's (faithfulness.attributed): right by construction, so its label becomes
    supported."""
    note = row["field"] != "reflection"
    if not note and faithfulness.copied_from(row["text"], row["passage"]) is not None:
        row["attributed"], row["label"] = row["label"], "supported"
        return None
    return (faithfulness.unborne(row["text"], row["passage"], notice, note=note)
            or faithfulness.check_note(row["text"], row["passage"]))


def outcome(rows: list[dict], cut, rebuild=lambda r: False) -> dict:
    """Reflections kept and faithful when the sentences `cut(row)` names are cut: a reflection
    whose prose loses every sentence is vetoed, unless `rebuild(row)` (the note judge cut its last
    sentence: the build rebuilds it from its claims' quotes, the passage's words); a kept one is
    faithful when every sentence it keeps is supported."""
    by = defaultdict(list)
    for row in rows:
        by[row["reflection"]].append(row)
    kept = faithful = 0
    for sentences in by.values():
        left = [r for r in sentences if not cut(r)]
        prose = [r for r in sentences if r["field"] == "reflection"]
        rebuilt = not any(r["field"] == "reflection" for r in left) and any(rebuild(r) for r in prose)
        if not rebuilt and not any(r["field"] == "reflection" for r in left):
            continue
        kept += 1
        faithful += all(r["label"] == "supported" for r in left)
    lost = sum(cut(r) and r["label"] == "supported" for r in rows)
    bad_cut = sum(cut(r) and r["label"] == "unsupported" for r in rows)
    return {"reflections": len(by), "kept": kept, "faithful": faithful, "supported_cut": lost, "unsupported_cut": bad_cut}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="qwen2.5-coder-1.5b")
    parser.add_argument("--results", type=Path, default=RESULTS / "note_judge.json")
    args = parser.parse_args()
    cfg, prompts = RatchetConfig(), Prompts()
    notice = faithfulness.notice_stems(prompts.audit_notice)
    rows = load()
    labelled_unsupported = sum(r["label"] == "unsupported" for r in rows)
    before = outcome(rows, lambda r: before_2026_12_07(r, notice) is not None)  # the labels as written
    for row in rows:
        row["rule"] = rule_of(row, notice)
    survivors = [r for r in rows if r["rule"] is None]
    copies = [r for r in rows if "attributed" in r]
    results: dict = {"sentences": len(rows), "unsupported": labelled_unsupported,
                     "attributed": len(copies), "attributed_unsupported": sum(r["attributed"] == "unsupported"
                                                                              for r in copies),
                     "kept_by_rules": len(survivors),
                     "unsupported_kept_by_rules": sum(r["label"] == "unsupported" for r in survivors),
                     "rules_before": before, "rules": outcome(rows, lambda r: r["rule"] is not None), "models": {}}
    print(f"{len(rows)} sentences ({results['unsupported']} labelled unsupported); {len(copies)} prose copies said "
          f"as the passage's ({results['attributed_unsupported']} of them labelled unsupported as written); "
          f"the rules keep {len(survivors)} "
          f"({results['unsupported_kept_by_rules']} unsupported); rules alone: {results['rules']}; "
          f"the rules of 6b31ca8 (no copy or praise rule): {before}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(RESULTS / "note_judge.duckdb"))
    create_schema(con)
    for model in args.models.split(","):
        with cached_engine(con, registry.parse({"model": f"bundled:{model}"}), model) as engine:
            start = time.perf_counter()
            outcomes = run_task(EntailmentTask(prompts, cfg), [(r["passage"], r["text"]) for r in survivors], engine)
            seconds = time.perf_counter() - start
        for row, answer in zip(survivors, outcomes):
            row[model] = round(answer.graded.p("no"), 4) if answer.graded else None
        judged = [r for r in survivors if r[model] is not None]
        by_field = {field: binary_scores([r["label"] == "unsupported" for r in judged if (r["field"] == "reflection") == prose],
                                         [r[model] for r in judged if (r["field"] == "reflection") == prose])
                    for field, prose in (("prose", True), ("notes", False))}
        m = {"seconds": round(seconds, 1), "judged": len(judged),
             "all": binary_scores([r["label"] == "unsupported" for r in judged], [r[model] for r in judged]),
             **by_field,
             "cut_at": {str(t): outcome(rows, lambda r, t=t: r["rule"] is not None
                                       or (r.get(model) is not None and r[model] >= t)) for t in THRESHOLDS},
             "notes_cut_at": {str(t): outcome(rows, lambda r, t=t: r["rule"] is not None
                                             or (r["field"] != "reflection" and r.get(model) is not None
                                                 and r[model] >= t)) for t in THRESHOLDS}}
        judged_cut = (lambda r, t_notes=0.5, t_prose=0.5: "attributed" not in r and r.get(model) is not None  # a copy
                      and r[model] >= (t_prose if r["field"] == "reflection" else t_notes))  # is not asked
        m["as_built"] = outcome(rows, lambda r: r["rule"] is not None or judged_cut(r),  # the defaults: 0.5 and 0.5
                                rebuild=lambda r: r["rule"] is None and judged_cut(r))
        results["models"][model] = m
        print(f"{model}: AUC {m['all']['auc']} {m['all']['auc_ci']} on {len(judged)} sentences the rules keep "
              f"(prose {m['prose']['auc']}, notes {m['notes']['auc']}); {seconds:.0f} s")
        for t, o in m["cut_at"].items():
            print(f"  cut at P >= {t}: {o}")
        for t, o in m["notes_cut_at"].items():
            print(f"  notes only, cut at P >= {t}: {o}")
        print(f"  as built (notes and prose at 0.5, a reflection cut whole rebuilt from its claims' quotes): "
              f"{m['as_built']}")
    (RESULTS / "note_judge.sentences.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "passage"}, ensure_ascii=False) + "\n" for r in rows),
        encoding="utf-8")
    args.results.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
