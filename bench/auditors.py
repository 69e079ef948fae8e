"""Which bundled model earns the model auditor's vote (`[audit] auditor`)? Each candidate audits
the kept reflections a person audited through the audit page, and its P(pass) is scored against
the person's verdict: AUC (the person's fails as positives), and accuracy and Cohen's kappa at
P(fail) >= 0.5, with 95% bootstrap intervals, beside the accuracy of always answering the
person's commoner verdict.

    .venv/bin/python bench/auditors.py [--models bundled:smollm2,bundled:qwen2.5-coder-0.5b]

The labelled reflections are the page audits of docs/faithfulness.md
(bench/results/faithfulness-audit-demo-page-2026-12-06*.jsonl): every kept reflection of three
demo builds, read by the project's engineer (an AI agent). Every call goes through a cache
(bench/results/auditors.duckdb): a rerun is free. One model at a time; writes
bench/results/auditors.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import duckdb  # noqa: E402

from builder.backends import make_backend  # noqa: E402
from builder.cache import CachedBackend  # noqa: E402
from builder.config import parse_config  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.audit import AuditTask, SampledItem  # noqa: E402
from builder.stages.base import run_task  # noqa: E402
from builder.stats import binary_scores  # noqa: E402
from builder.workspace import create_schema  # noqa: E402

RESULTS = Path(__file__).parent / "results"
AUDITS = sorted(RESULTS.glob("faithfulness-audit-demo-page-2026-12-06*.jsonl"))
MODELS = "bundled:smollm2,bundled:qwen2.5-coder-0.5b,bundled:qwen2.5-coder-1.5b"


def labelled() -> list[dict]:
    rows = []
    for path in AUDITS:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS, help="comma-separated GGUF paths or bundled:NAME")
    args = ap.parse_args()
    rows = labelled()
    fails = [int(r["verdict"] == "fail") for r in rows]
    majority = max(sum(fails), len(fails) - sum(fails)) / len(fails)
    print(f"{len(rows)} reflections from {len(AUDITS)} audits, {sum(fails)} failed by the person; "
          f"always answering the commoner verdict: accuracy {majority:.2f}", flush=True)
    cfg, prompts = parse_config({}), Prompts()
    sampled = [SampledItem(r["passage_id"], "", r["passage"], r["annotation"]) for r in rows]
    cache = duckdb.connect(str(RESULTS / "auditors.duckdb"))
    create_schema(cache)
    results = []
    for model in args.models.split(","):
        started = time.perf_counter()
        with ExitStack() as stack:
            engine = CachedBackend(stack.enter_context(make_backend(cfg.engine_for(model))), cache)
            outcomes = run_task(AuditTask(prompts, cfg, model), sampled, engine)
        judged = [(label, 1 - o.graded.p("pass")) for label, o in zip(fails, outcomes) if o.graded]
        scores = binary_scores([y for y, _ in judged], [p for _, p in judged])
        scores.update(model=model, judged=len(judged), seconds=round(time.perf_counter() - started, 1),
                      says_fail=sum(p >= 0.5 for _, p in judged))
        results.append(scores)
        print(f"{model}: n {scores['n']}, says fail {scores['says_fail']}, AUC {scores['auc']} {scores['auc_ci']}, "
              f"accuracy {scores['accuracy']} {scores['accuracy_ci']}, kappa {scores['kappa']} {scores['kappa_ci']}, "
              f"{scores['seconds']} s", flush=True)
    out = {"labelled": [p.name for p in AUDITS], "n": len(rows), "fails": sum(fails), "majority_accuracy": majority,
           "auditors": results}
    (RESULTS / "auditors.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'auditors.json'}")


if __name__ == "__main__":
    main()
