"""A build on Ray against the same build here, side by side in one run.

The demo's config (examples/ratchet.toml: Qwen-0.5B writes under the faithfulness gates,
Qwen-1.5B judges its notes and sentences) on the first N passages of its corpus, twice from an
empty cache with the same audit secret: once with the local executor, once on a local Ray cluster started by the build
(`address = "local"`). Prints each build's seconds, the ratio, the share of prompt tokens served
from a cached prefix, the engines the Ray build started, and whether the splits are identical
(not expected with several slots and a prompt cache: docs/ray.md, "Same results").

Usage: python bench/ray_build.py [--passages 6] [--concurrency 1] [--num-cpus 2]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.build import run_build  # noqa: E402
from builder.config import ExecutorConfig  # noqa: E402
from builder.executors import ACTOR_LOG, RayExecutor  # noqa: E402
from builder.models import resolve_model  # noqa: E402
from builder.stages.audit import SECRET_FILE  # noqa: E402
from builder.workspace import Workspace  # noqa: E402


def workspace(root: Path, passages: int) -> Path:
    (root / "corpus").mkdir(parents=True)
    lines = (ROOT / "examples/corpus/passages.jsonl").read_text().splitlines()[:passages]
    (root / "corpus/passages.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(ROOT / "examples/ratchet.toml", root / "ratchet.toml")
    (root / SECRET_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / SECRET_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    (root / SECRET_FILE).chmod(0o600)
    return root


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "generations" / "gen-0001").rglob("*.parquet"))}


def timed(root: Path, executor=None) -> tuple[float, dict]:
    start = time.perf_counter()
    summary = run_build(Workspace(root), executor=executor)
    return time.perf_counter() - start, summary


def cached_share(summary: dict) -> float:
    prompt = summary.get("prompt_tokens", 0)
    return summary.get("cached_prompt_tokens", 0) / prompt if prompt else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passages", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=1, help="actors per engine on Ray")
    parser.add_argument("--num-cpus", type=float, default=2.0, help="CPUs per actor (its llama-server's threads)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ray_build.json")
    args = parser.parse_args()
    for name in ("bundled:qwen2.5-coder-0.5b", "bundled:gemma3", "bundled:smollm2"):  # both builds read them warm
        resolve_model(name).read_bytes()
    with tempfile.TemporaryDirectory(prefix="ratchet-ray-bench-") as tmp:
        local = workspace(Path(tmp) / "local", args.passages)
        remote = workspace(Path(tmp) / "ray", args.passages)
        here_s, here = timed(local)
        executor = RayExecutor(ExecutorConfig(kind="ray", address="local", concurrency=args.concurrency,
                                              num_cpus=args.num_cpus))
        try:
            there_s, there = timed(remote, executor)
        finally:
            executor.close()
        starts = (remote / "logs" / ACTOR_LOG).read_text().count(" started ")
        result = {
            "passages": args.passages, "concurrency": args.concurrency, "num_cpus": args.num_cpus,
            "local_s": round(here_s, 1), "ray_s": round(there_s, 1), "ratio": round(there_s / here_s, 2),
            "model_calls": {"local": here["model_calls"], "ray": there["model_calls"]},
            "cached_prefix": {"local": round(cached_share(here), 3), "ray": round(cached_share(there), 3)},
            "engine_starts": starts, "ray_stages": there["executor"].get("stages"),
            "identical_splits": digests(local) == digests(remote),
        }
    print(f"{args.passages} passages, the demo's config, 2 cores")
    print(f"  local {result['local_s']} s, ray {result['ray_s']} s: ray/local {result['ratio']}x")
    print(f"  model calls: local {result['model_calls']['local']}, ray {result['model_calls']['ray']}")
    print(f"  prompt tokens from a cached prefix: local {result['cached_prefix']['local']:.0%}, "
          f"ray {result['cached_prefix']['ray']:.0%}")
    print(f"  engines started on Ray: {starts}; identical splits: {result['identical_splits']}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
