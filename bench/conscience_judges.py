"""Every bundled model as the conscience judge, on the same labelled pairs, side by side.

The conscience judge labels a (prompt, response) pair ethical, neutral or unethical under a
framework; which model is the default (`[conscience] judge`) should follow what each one shows
(issue 30, scope 7). For each bundled model this runs the product's own check,

    ratchet eval-judge examples/code_hacking/judge_eval.jsonl --kind conscience \
        --framework three-laws --judge bundled:NAME --output F

(36 pairs, 12 per label; the default engine; a throwaway call cache, so every answer is asked
afresh) and prints, per model, the calibrated labels' accuracy and Cohen's kappa (the labels
that decide) and the AUC of P(unethical), the unethical pairs against the rest, from the raw
and the calibrated distributions, each with a 95% bootstrap interval (builder.stats.binary_scores, as bench/judges.py).

Usage: python bench/conscience_judges.py [--framework three-laws] [--models smollm2,gemma3,...]
       [--results FILE.json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from builder.stats import binary_scores  # noqa: E402
from judges import fmt  # noqa: E402  (bench/judges.py: an AUC with its interval)

PAIRS = ROOT / "examples" / "code_hacking" / "judge_eval.jsonl"
MODELS = ["smollm2", "gemma3", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def evaluate(model: str, framework: str, out: Path) -> dict:
    """One model through `ratchet eval-judge`; its metrics, its AUCs with intervals, its seconds."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "builder.cli", "eval-judge", str(PAIRS), "--kind", "conscience",
                    "--framework", framework, "--judge", f"bundled:{model}", "--output", str(out)],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    result = json.loads(out.read_text())
    labels = [int(i["gold"] == "unethical") for i in result["items"]]
    row = {"model": model, "seconds": round(seconds, 1), **{k: result["metrics"]["calibrated"][k]
                                                            for k in ("accuracy", "cohen_kappa")}}
    for read in ("probs", "calibrated"):
        scores = binary_scores(labels, [i[read]["unethical"] for i in result["items"]])
        row[f"auc_{read}"], row[f"auc_{read}_ci"] = scores["auc"], scores["auc_ci"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", default="three-laws")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--results", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            print(f"judging with {model} ...", file=sys.stderr, flush=True)
            rows.append(evaluate(model, args.framework, Path(tmp) / f"{model}.json"))
    print(f"{PAIRS.relative_to(ROOT)} ({args.framework}), one model at a time")
    print("| judge | accuracy (calibrated labels) | Cohen's kappa | AUC raw [95% CI] | AUC calibrated [95% CI] | s |")
    print("| --- | ---: | ---: | --- | --- | ---: |")
    for r in rows:
        raw, calibrated = ({"auc": r[f"auc_{k}"], "auc_ci": r[f"auc_{k}_ci"]} for k in ("probs", "calibrated"))
        print(f"| {r['model']} | {r['accuracy']:.3f} | {r['cohen_kappa']:+.3f} | {fmt(raw)} | {fmt(calibrated)} "
              f"| {r['seconds']:.0f} |")
    if args.results:
        args.results.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
