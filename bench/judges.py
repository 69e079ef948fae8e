"""Which model judges best? The grounding and harm judges of `ratchet judge`, measured side by
side on labelled data, with AUC, accuracy and Cohen's kappa and 95% bootstrap intervals.

grounding (is a claim what its passage says?):
  labelled   bench/data/demo-claims.labelled.jsonl: 112 claims the demo's writer (Qwen2.5-Coder-0.5B)
             wrote about 30 passages of the bundled corpus, each read against its passage and
             labelled supported or unsupported by a person (bench/data/README.md says how)
  negated    the supported claims against the same claims negated    (builder/validity.py)
  number     ... against the same claims with a number changed
  entity     ... against the same claims with a name swapped for another passage's
  other      ... against another passage's supported claim
  Judges: the rules alone, each model alone, and the cascade (rules, then the model).
harm (is a response harmful?):
  pyrit      bench/data/pyrit-harm.sample.jsonl: 32 responses with human harm scores from PyRIT
             1.1.0 (MIT), 2 harmful and 2 not per category (regenerate with --pyrit WHEEL)
  code       examples/code_hacking/judge_eval.jsonl: 36 answers, unethical vs the rest

Each model runs alone (one llama-server at a time); answers are cached in
bench/results/judges.duckdb, so a rerun is free. Seconds per judgement are printed per model.

    .venv/bin/python bench/judges.py [--models qwen2.5-coder-1.5b,...] [--kinds grounding,harm]

Writes bench/results/judges.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from builder.backends import registry  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.evaluate import cached_engine  # noqa: E402
from builder.judges import judge_grounding, judge_harm, rows_from  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stats import binary_scores  # noqa: E402
from builder.validity import change_number, names_of, negate_claim, swap_entity  # noqa: E402
from builder.workspace import create_schema  # noqa: E402

DATA = ROOT / "bench" / "data"
RESULTS = ROOT / "bench" / "results"
MODELS = ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "gemma3", "smollm2"]
PYRIT_SAMPLE = DATA / "pyrit-harm.sample.jsonl"
PYRIT_CATEGORIES = ["exploits", "hate_speech", "info_integrity", "privacy", "representational", "self_harm",
                    "sexual", "violence"]


# ---------------------------------------------------------------- data sets


def pyrit_sample(wheel: Path, per_class: int = 2, max_chars: int = 1500, seed: int = 0) -> list[dict]:
    """From PyRIT's wheel: per harm category, `per_class` rows with a human score >= 0.5 (harmful)
    and as many below, drawn at random among responses of at most `max_chars` characters (a
    judge's prompt on 2 cores must stay short; the filter is by length, not by content)."""
    rng, out = random.Random(seed), []
    with zipfile.ZipFile(wheel) as z:
        for category in PYRIT_CATEGORIES:
            text = z.read(f"pyrit/datasets/scorer_evals/harm/{category}.csv").decode("utf-8")
            rows = list(csv.DictReader(io.StringIO(text.split("\n", 1)[1])))  # line 1: a version comment
            score = next(k for k in rows[0] if k.startswith("human_score"))
            short = [r for r in rows if len(r["assistant_response"]) <= max_chars and r[score].strip()]
            for harmful in (True, False):
                pool = [r for r in short if (float(r[score]) >= 0.5) == harmful]
                for r in rng.sample(pool, min(per_class, len(pool))):
                    out.append({"prompt": r["objective"], "response": r["assistant_response"], "category": category,
                                "human_score": float(r[score]), "label": int(harmful),
                                "source": f"pyrit 1.1.0 scorer_evals/harm/{category}.csv"})
    return out


def grounding_sets(pairs: int = 30, seed: int = 0) -> dict[str, list[dict]]:
    """The labelled claims, and per perturbation up to `pairs` (supported claim, variant) pairs
    drawn at random (seed 0) among the supported claims the perturbation applies to."""
    labelled = [json.loads(line) for line in (DATA / "demo-claims.labelled.jsonl").read_text().splitlines() if line]
    base = [{"passage": r["passage"], "claim": r["claim"], "label": r["label"]} for r in labelled]
    supported = [r for r in labelled if r["label"] == "supported"]
    passages = {r["passage_id"]: r["passage"] for r in labelled}
    sets = {"labelled": base}
    rng = random.Random(seed)
    for kind in ("negated", "number", "entity", "other"):
        rows = []
        for r in supported:
            pool = [n for pid, text in passages.items() if pid != r["passage_id"] for n in names_of(text)]
            if kind == "negated":
                variant = negate_claim(r["claim"])
            elif kind == "number":
                variant = change_number(r["claim"])
            elif kind == "entity":
                variant = swap_entity(r["claim"], sorted(set(pool)))
            else:
                variant = rng.choice([o for o in supported if o["passage_id"] != r["passage_id"]])["claim"]
            if variant and variant != r["claim"]:
                rows += [{"passage": r["passage"], "claim": r["claim"], "label": "supported"},
                         {"passage": r["passage"], "claim": variant, "label": "unsupported"}]
        chosen = sorted(rng.sample(range(len(rows) // 2), min(pairs, len(rows) // 2)))
        sets[kind] = [row for i in chosen for row in rows[2 * i:2 * i + 2]]
    return sets


def harm_sets() -> dict[str, list[dict]]:
    pyrit = [json.loads(line) for line in PYRIT_SAMPLE.read_text().splitlines() if line]
    code = [json.loads(line) for line in (ROOT / "examples/code_hacking/judge_eval.jsonl").read_text().splitlines() if line]
    return {"pyrit": [{"prompt": r["prompt"], "response": r["response"], "label": r["label"]} for r in pyrit],
            "code": [{"prompt": r["prompt"], "response": r["response"],
                      "label": "harmful" if r["label"] == "unethical" else "harmless"} for r in code]}


def rows_of(kind: str, data: list[dict], name: str):
    return rows_from([(f"{name}:{i + 1}", r) for i, r in enumerate(data)], kind, label_field="label")


# ---------------------------------------------------------------- running


def scores(rows) -> dict:
    judged = [r for r in rows if r.p is not None]
    return {**binary_scores([r.label for r in judged], [r.p for r in judged]), "unjudged": len(rows) - len(judged)}


def run(models: list[str], kinds: list[str], con) -> dict:
    cfg, prompts = RatchetConfig(), Prompts()
    results: dict = {"grounding": {}, "harm": {}, "seconds_per_judgement": {}, "sets": {}}
    g_sets = grounding_sets() if "grounding" in kinds else {}
    h_sets = harm_sets() if "harm" in kinds else {}
    results["sets"] = {name: len(data) for name, data in {**g_sets, **h_sets}.items()}
    for name, data in g_sets.items():
        rows = rows_of("grounding", data, name)
        judge_grounding(rows, None, prompts, cfg, use_model=False)
        results["grounding"].setdefault(name, {})["rules"] = scores(rows)
    for model in models:
        with cached_engine(con, registry.parse({"model": f"bundled:{model}"}), model) as engine:
            calls, start = 0, time.perf_counter()
            for name, data in g_sets.items():
                rows = rows_of("grounding", data, name)
                judge_grounding(rows, engine, prompts, cfg, use_rules=False)
                results["grounding"][name][model] = scores(rows)
                calls += len(rows)
                rows = rows_of("grounding", data, name)
                judge_grounding(rows, engine, prompts, cfg)  # the cascade: its model calls are cached above
                results["grounding"][name][f"rules+{model}"] = scores(rows)
                print(f"grounding/{name} {model}: model {results['grounding'][name][model]['auc']}, "
                      f"cascade {results['grounding'][name][f'rules+{model}']['auc']}", flush=True)
            for name, data in h_sets.items():
                rows = rows_of("harm", data, name)
                judge_harm(rows, engine, prompts, cfg)
                results["harm"].setdefault(name, {})[model] = scores(rows)
                calls += len(rows)
                print(f"harm/{name} {model}: {results['harm'][name][model]['auc']}", flush=True)
            seconds = time.perf_counter() - start
            results["seconds_per_judgement"][model] = {"seconds": round(seconds, 1), "judgements": calls}
    return results


def fmt(m: dict) -> str:
    if m["auc"] is None:
        return "n/a"
    lo, hi = m["auc_ci"] or (float("nan"), float("nan"))
    return f"{m['auc']:.2f} [{lo:.2f}, {hi:.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--kinds", default="grounding,harm")
    parser.add_argument("--pyrit", type=Path, help="pyrit-1.1.0-py3-none-any.whl: regenerate the harm sample from it "
                        "(pip download pyrit==1.1.0 --no-deps)")
    parser.add_argument("--results", type=Path, default=RESULTS / "judges.json")
    args = parser.parse_args()
    if args.pyrit:
        sample = pyrit_sample(args.pyrit)
        PYRIT_SAMPLE.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample), encoding="utf-8")
        print(f"wrote {PYRIT_SAMPLE} ({len(sample)} rows)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(RESULTS / "judges.duckdb"))
    create_schema(con)
    results = run(args.models.split(","), args.kinds.split(","), con)
    args.results.write_text(json.dumps(results, indent=2))
    for kind in ("grounding", "harm"):
        for name, judges in results[kind].items():
            print(f"{kind}/{name} (n {results['sets'][name]}): AUC [95% CI]")
            for judge, m in judges.items():
                print(f"  {judge:28s} {fmt(m)}  accuracy {m['accuracy']}  kappa {m['kappa']}")
    for model, t in results["seconds_per_judgement"].items():
        print(f"{model}: {t['seconds']} s for {t['judgements']} judgements "
              f"({t['seconds'] / max(t['judgements'], 1):.2f} s each, cached answers included)")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
