"""A reflection the gates refuse whole: asked again alone, or the whole answer retried.

The demo's config (examples/ratchet.toml) on the first N passages of its corpus, built twice,
each from an empty cache with the same audit secret:

  whole       annotate.rewrite_reflection = 0: such an answer is vetoed and retried whole
  reflection  the default (2): the answer's verified claims are kept and its writer is asked
              for the reflection alone, up to twice; then it is rebuilt from the claims' quotes

Prints each build's seconds and its ratio to the first arm's, the writer's completion tokens
and phase (bench/layouts.py's measure), the calls, what each build accepted, and the
reflections asked again (rewritten, rebuilt). The answers differ between the arms beyond the
retries (llama-server's batched slots do not repeat their floating-point sums), so the kept
counts show what a build keeps, not what one answer became. Every kept reflection of both
builds, with its passage, goes to --out-jsonl, for a person to read side by side.

Usage: python bench/reprose.py [--passages 30] [--arms whole,reflection] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from layouts import WRITER, writer_phase  # noqa: E402  (the writer's tokens and phase)
from ray_build import workspace  # noqa: E402  (the demo's config on the first N passages)

from builder.build import run_build  # noqa: E402
from builder.models import resolve_model  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

ARMS = {"whole": 0, "reflection": None}  # annotate.rewrite_reflection (None: the default)


def with_rewrites(root: Path, rewrites: int | None) -> None:
    if rewrites is None:
        return
    config = (root / "ratchet.toml").read_text()
    assert config.count("\nrewrite_reflection = ") == 1  # the demo's config sets it under [annotate]
    (root / "ratchet.toml").write_text(re.sub(r"\nrewrite_reflection = \d+\n", f"\nrewrite_reflection = {rewrites}\n",
                                              config))


def kept_rows(root: Path) -> list[dict]:
    con = Workspace(root).connect(read_only=True)
    rows = con.execute("""SELECT a.passage_id, p.text, a.status, a.reason, a.attempts, a.record, a.rewrite,
                                 a.note_checks FROM annotations a JOIN passages p USING (passage_id)
                          ORDER BY p.text""").fetchall()
    con.close()
    load = lambda v: json.loads(v) if v else None  # noqa: E731
    return [{"passage_id": pid, "passage": text, "status": status, "reason": reason, "attempts": attempts,
             "record": load(record), "rewrite": load(rewrite), "note_checks": load(notes)}
            for pid, text, status, reason, attempts, record, rewrite, notes in rows]


def run_arm(base: Path, name: str, passages: int) -> tuple[dict, list[dict]]:
    root = workspace(base / name, passages)
    with_rewrites(root, ARMS[name])
    start = time.perf_counter()
    summary = run_build(Workspace(root))
    seconds = time.perf_counter() - start
    tokens, phase = writer_phase(root)
    rows = kept_rows(root)
    asked = [r for r in rows if r["rewrite"]]
    return ({"seconds": round(seconds, 1), "model_calls": summary["model_calls"], "accepted": summary["accepted"],
             "writer_tokens": tokens, "writer_seconds": round(phase, 1),
             "writer_answers": sum(r["attempts"] for r in rows),
             "asked_again": len(asked),
             "rewritten": sum(r["rewrite"].get("verdict") == "rewritten" for r in asked),
             "rebuilt": sum(r["rewrite"].get("verdict") == "rebuilt" for r in asked)}, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=30)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--keep", type=Path, default=None, help="build the workspaces here and keep them")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/reprose.json")
    parser.add_argument("--out-jsonl", type=Path, default=ROOT / "bench/results/reprose-reflections.jsonl")
    args = parser.parse_args()
    arms = args.arms.split(",")
    if unknown := [a for a in arms if a not in ARMS]:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    for name in (WRITER, "bundled:qwen2.5-coder-1.5b"):  # every arm reads them warm
        resolve_model(name).read_bytes()
    results, reflections = {}, []
    with tempfile.TemporaryDirectory(prefix="ratchet-reprose-bench-") as tmp:
        base = args.keep or Path(tmp)
        for name in arms:
            results[name], rows = run_arm(base, name, args.passages)
            reflections += [{"arm": name, **r} for r in rows]
            print(name, json.dumps(results[name]), flush=True)
    first = results[arms[0]]
    print(f"\n{args.passages} passages, the demo's config, the cores this process may use")
    print(f"{'arm':<12}{'build s':>9}{'vs ' + arms[0]:>12}{'writer s':>10}{'writer tok':>12}{'answers':>9}"
          f"{'calls':>7}{'accepted':>10}{'asked again':>13}{'rewritten':>11}{'rebuilt':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['seconds']:>9}{first['seconds'] / r['seconds']:>11.2f}x{r['writer_seconds']:>10}"
              f"{r['writer_tokens']:>12}{r['writer_answers']:>9}{r['model_calls']:>7}{r['accepted']:>10}"
              f"{r['asked_again']:>13}{r['rewritten']:>11}{r['rebuilt']:>9}")
    args.out.write_text(json.dumps({"passages": args.passages, "arms": results}, indent=1) + "\n")
    args.out_jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reflections))


if __name__ == "__main__":
    main()
