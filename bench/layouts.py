"""The demo's build under each llama-server layout, side by side in one run.

The demo's config (examples/ratchet.toml: Qwen-0.5B writes under the faithfulness gates,
Qwen-1.5B judges its notes and sentences) on the first N passages of its corpus, once per
layout of the `[annotator]` engine, each from an empty cache with the same audit secret:

  slots-4     one server a model, 4 slots (the default)
  slots-0     one server a model, one slot per thread (`slots = 0`: 2 on 2 cores)
  replicas-2  two servers a model side by side, one thread and one slot each

Prints each build's seconds and its ratio to the first arm's, the writer's phase (from the
first request sent to the last answer stored) and its completion tokens per second (robust to
builds that retry a different number of times), the rest of the build outside that phase
(start-up; the note judge, the ratchet and compile after it), the calls, and what each build
accepted. The
outputs differ between layouts (a slot's batch changes the numerics); the kept counts show
whether a layout changed what a build keeps, not just its speed.

Usage: python bench/layouts.py [--passages 8] [--arms slots-4,slots-0,replicas-2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ray_build import workspace  # noqa: E402  (the demo's config on the first N passages)

from builder.build import run_build  # noqa: E402
from builder.models import resolve_model  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

LAYOUTS = {
    "slots-4": {"slots": 4},
    "slots-0": {"slots": 0},
    "replicas-2": {"slots": 0, "replicas": 2},
}
WRITER = "bundled:qwen2.5-coder-0.5b"


def with_layout(root: Path, layout: dict) -> None:
    """The demo's [annotator] section with the layout's keys added (every model's engine keys)."""
    config = (root / "ratchet.toml").read_text()
    keys = "".join(f"{k} = {v}\n" for k, v in layout.items())
    assert config.count("[annotator]\n") == 1
    (root / "ratchet.toml").write_text(config.replace("[annotator]\n", "[annotator]\n" + keys, 1))


def writer_phase(root: Path) -> tuple[int, float]:
    """The writer's completion tokens and the seconds from its first request to its last answer."""
    con = Workspace(root).connect(read_only=True)
    digest = con.execute("SELECT model_id FROM model_calls GROUP BY model_id ORDER BY sum(completion_tokens) DESC "
                         "LIMIT 1").fetchone()[0]  # the writer writes the most tokens (the judges one each)
    tokens, first, last, first_s = con.execute(
        "SELECT sum(completion_tokens), min(created_at), max(created_at), "
        "arg_min(seconds, created_at) FROM model_calls WHERE model_id = ?", [digest]).fetchone()
    con.close()
    return int(tokens or 0), (last - first).total_seconds() + (first_s or 0.0)


def measured_build(root: Path) -> dict:
    """One build of the workspace, timed: seconds, calls, accepted, the writer's tokens and phase."""
    start = time.perf_counter()
    summary = run_build(Workspace(root))
    seconds = time.perf_counter() - start
    tokens, phase = writer_phase(root)
    return {"seconds": round(seconds, 1), "model_calls": summary["model_calls"], "accepted": summary["accepted"],
            "writer_tokens": tokens, "writer_seconds": round(phase, 1),
            "writer_tokens_per_s": round(tokens / phase, 1) if phase > 0 else None}


def run_arm(tmp: Path, name: str, passages: int) -> dict:
    root = workspace(tmp / name, passages)
    with_layout(root, LAYOUTS[name])
    return measured_build(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--arms", default=",".join(LAYOUTS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/layouts.json")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in LAYOUTS]
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; known: {', '.join(LAYOUTS)}")
    for name in (WRITER, "bundled:qwen2.5-coder-1.5b"):  # every arm reads them warm
        resolve_model(name).read_bytes()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ratchet-layouts-bench-") as tmp:
        for name in arms:
            results[name] = run_arm(Path(tmp), name, args.passages)
            print(name, json.dumps(results[name]), flush=True)
    base = results[arms[0]]
    print(f"\n{args.passages} passages, the demo's config, the cores this process may use")
    print(f"{'layout':<12}{'build s':>9}{'vs ' + arms[0]:>14}{'writer s':>10}{'writer tok/s':>14}{'rest s':>8}"
          f"{'calls':>7}{'accepted':>10}")
    for name, r in results.items():  # rest: the build outside the writer's phase
        print(f"{name:<12}{r['seconds']:>9}{base['seconds'] / r['seconds']:>13.2f}x{r['writer_seconds']:>10}"
              f"{r['writer_tokens_per_s']:>14}{r['seconds'] - r['writer_seconds']:>8.1f}{r['model_calls']:>7}"
              f"{r['accepted']:>10}")
    args.out.write_text(json.dumps({"passages": args.passages, "arms": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
