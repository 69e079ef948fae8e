"""Which writer, and which few-shot examples, give the most reflections that pass the
faithfulness gates per minute? Measured side by side in one run on the same passages.

For each bundled model and each examples variant (the built-in prompts/annotate.examples.jsonl,
and none: the grammar alone carries the form), every passage is annotated once (no retry), through
the default engine, and the gates of builder/faithfulness.py run on each answer. Printed per row:
seconds, valid answers, answers that pass every gate, echoes of a prompt example, claims
written and kept, and gate-passing reflections per minute. Passing the gates is necessary for
faithfulness, not sufficient: the audit page is where a person checks the rest.

Usage: python bench/annotators.py [--passages 10] [--models smollm2,gemma3,...] [--results F.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.backends import registry  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.corpus import Passage  # noqa: E402
from builder.evaluate import cached_engine  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.annotate import annotate  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

MODELS = ["smollm2", "gemma3", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]


def passages(n: int) -> list[Passage]:
    rows = [json.loads(line)["text"] for line in (ROOT / "examples/corpus/passages.jsonl").read_text().splitlines()]
    return [Passage(f"p{i}", "bench", i, text, len(text.split())) for i, text in enumerate(rows[:n])]


def run(model: str, few_shot: bool, items: list[Passage], ws: Workspace) -> dict:
    cfg = RatchetConfig.model_validate({"annotator": {"model": f"bundled:{model}"}, "annotate": {"retries": 0}})
    con = ws.connect()
    try:
        with cached_engine(con, registry.parse({"model": f"bundled:{model}"}), model) as engine:
            start = time.perf_counter()
            rows = annotate(items, engine, Prompts(), cfg, annotator=model, few_shot=few_shot)
            seconds = time.perf_counter() - start
    finally:
        con.close()
    reasons = Counter((r.reason or "").split(":")[0] for r in rows if r.status != "accepted")
    checks = [c for r in rows for c in r.claim_checks or []]
    passed = sum(r.status == "accepted" for r in rows)
    return {"seconds": round(seconds, 1), "passages": len(rows), "passed": passed,
            "vetoed": dict(sorted(reasons.items())), "claims_kept": sum(c["verdict"] == "supported" for c in checks),
            "claims_written": len(checks), "passed_per_min": round(60 * passed / seconds, 2) if seconds else None,
            "kept": [{"passage": r.passage_id, "record": r.record} for r in rows if r.status == "accepted"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="examples,none")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="annotators-"))
    (root / "ratchet.toml").write_text("")
    ws = Workspace(root)
    items = passages(args.passages)
    results = {}
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            results[f"{model} / {variant}"] = r = run(model, variant == "examples", items, ws)
            print(f"{model} / {variant}: " + json.dumps({k: v for k, v in r.items() if k != "kept"}), flush=True)
    print(f"\n{args.passages} passages, one answer each (no retry), default engine:\n")
    print("| writer / examples | s | passed gates | echo | claims kept / written | passed per min |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.0f} | {r['passed']} of {r['passages']} | {r['vetoed'].get('echo', 0)} | "
              f"{r['claims_kept']} / {r['claims_written']} | {r['passed_per_min']} |")
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
