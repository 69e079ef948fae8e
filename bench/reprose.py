"""A reflection the gates refuse whole, in an answer with a verified claim: rebuilt, asked
again, or the whole answer retried (annotate.refused_reflection).

The demo's config (examples/ratchet.toml) on the first N passages of its corpus, built once
per arm, each from an empty cache with the same audit secret:

  retry    the answer is vetoed and retried whole (as before 2026-12-08)
  rebuild  the answer is kept, its reflection rebuilt from its claims' quotes (the default)
  ask      the answer is kept and its writer asked for the reflection alone, up to
           rewrite_reflection times; then it is rebuilt

Prints each build's seconds and its ratio to the first arm's, the writer's completion tokens
and phase (bench/layouts.py's measure), the calls, what each build accepted, and the
reflections refused whole in answers kept (rewritten, rebuilt). The answers differ between the
arms beyond the retries (llama-server's batched slots do not repeat their floating-point
sums), so the kept counts show what a build keeps, not what one answer became. Every
annotation of every arm, with its passage, goes to --out-jsonl, for a person to read side by
side.

Usage: python bench/reprose.py [--passages 30] [--arms retry,rebuild] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from layouts import WRITER, measured_build  # noqa: E402  (a timed build: the writer's tokens and phase)
from ray_build import workspace  # noqa: E402  (the demo's config on the first N passages)

from builder.models import resolve_model  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

ARMS = ("retry", "rebuild", "ask")  # annotate.refused_reflection


def with_mode(root: Path, mode: str) -> None:
    config = (root / "ratchet.toml").read_text()
    assert config.count("\nrefused_reflection = ") == 1  # the demo's config sets it under [annotate]
    (root / "ratchet.toml").write_text(re.sub(r'\nrefused_reflection = "\w+"\n', f'\nrefused_reflection = "{mode}"\n',
                                              config))


def annotation_rows(root: Path) -> list[dict]:
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
    with_mode(root, name)
    measured = measured_build(root)
    rows = annotation_rows(root)
    asked = [r for r in rows if r["rewrite"] and r["status"] == "accepted"]
    return ({**measured, "writer_answers": sum(r["attempts"] for r in rows),
             "refused_kept": len(asked),
             "rewritten": sum(r["rewrite"].get("verdict") == "rewritten" for r in asked),
             "rebuilt": sum(r["rewrite"].get("verdict") == "rebuilt" for r in asked)}, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=30)
    parser.add_argument("--arms", default="retry,rebuild")
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
          f"{'calls':>7}{'accepted':>10}{'refused, kept':>15}{'rewritten':>11}{'rebuilt':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['seconds']:>9}{first['seconds'] / r['seconds']:>11.2f}x{r['writer_seconds']:>10}"
              f"{r['writer_tokens']:>12}{r['writer_answers']:>9}{r['model_calls']:>7}{r['accepted']:>10}"
              f"{r['refused_kept']:>15}{r['rewritten']:>11}{r['rebuilt']:>9}")
    args.out.write_text(json.dumps({"passages": args.passages, "arms": results}, indent=1) + "\n")
    args.out_jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reflections))


if __name__ == "__main__":
    main()
