"""Builder overhead against the raw engine, measured side by side in one run.

Same N passages, same prompts, same schema, same sampling and seed:
  raw      llama-cpp-python `create_chat_completion` with response_format=json_object+schema
  builder  `ratchet build` on a fresh workspace (ingest, cache, validation, retries, compile)
  rebuild  `ratchet build` again: must make zero model calls
  distilabel (optional, `pip install '.[bench]'`): its LlamaCppLLM pipeline on the same job

Usage: python bench/overhead.py [--passages N] [--max-tokens T]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.build import run_build  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.models import resolve_model  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.resources import load_schema  # noqa: E402
from builder.workspace import Workspace  # noqa: E402


def sample_texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in (ROOT / "examples/corpus/passages.jsonl").read_text().splitlines()]
    return rows[:n]


def raw_engine(texts, cfg: RatchetConfig) -> tuple[float, int, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(resolve_model(cfg.annotator.model)), n_ctx=cfg.annotator.n_ctx,
                n_threads=os.cpu_count(), n_batch=512, verbose=False)
    prompts, schema, s = Prompts(), load_schema("annotation"), cfg.sampling
    valid = tokens = 0
    start = time.perf_counter()
    for text in texts:
        out = llm.create_chat_completion(
            messages=list(prompts.annotation_messages(text)), max_tokens=s.max_tokens, temperature=s.temperature,
            top_p=s.top_p, repeat_penalty=s.repeat_penalty, seed=s.seed,
            response_format={"type": "json_object", "schema": schema})
        tokens += out["usage"]["completion_tokens"]
        try:
            json.loads(out["choices"][0]["message"]["content"])
            valid += out["choices"][0]["finish_reason"] == "stop"
        except json.JSONDecodeError:
            pass
    seconds = time.perf_counter() - start
    llm.close()
    return seconds, valid, tokens


def builder(texts, root: Path) -> tuple[float, dict]:
    ws_dir = root / "ws"
    (ws_dir / "corpus").mkdir(parents=True)
    (ws_dir / "corpus/c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    # like for like: the annotation job only (one member, no critics, no audit)
    (ws_dir / "ratchet.toml").write_text("[audit]\nrate = 0.0\n[ensemble]\nk = 0\n"
                                         "[[ensemble.members]]\nname = \"smollm2\"\npersona = \"default\"\n")
    start = time.perf_counter()
    summary = run_build(Workspace(ws_dir))
    return time.perf_counter() - start, summary


def distilabel_pipeline(texts, cfg: RatchetConfig) -> tuple[float, int] | None:
    """distilabel's LlamaCppLLM on the same messages (few-shot turns included), same schema
    through the same `response_format`, same sampling. None when distilabel is not installed."""
    try:
        from distilabel.models import LlamaCppLLM
        from distilabel.pipeline import Pipeline
        from distilabel.steps import LoadDataFromDicts
        from distilabel.steps.tasks import ChatGeneration
    except ImportError:
        return None
    prompts, schema, s = Prompts(), load_schema("annotation"), cfg.sampling
    rows = [{"messages": list(prompts.annotation_messages(t))} for t in texts]
    llm = LlamaCppLLM(model_path=str(resolve_model(cfg.annotator.model)), n_ctx=cfg.annotator.n_ctx, n_batch=512,
                      extra_kwargs={"n_threads": os.cpu_count()},
                      generation_kwargs={"max_new_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                                         "extra_generation_kwargs": {"response_format": {"type": "json_object", "schema": schema},
                                                                     "repeat_penalty": s.repeat_penalty, "seed": s.seed}})
    with Pipeline(name="ratchet-overhead-bench") as pipeline:
        LoadDataFromDicts(data=rows) >> ChatGeneration(llm=llm, input_batch_size=len(rows))
    start = time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    seconds = time.perf_counter() - start
    valid = 0
    for text in distiset["default"]["train"]["generation"]:
        try:
            json.loads(text or "")
            valid += 1
        except json.JSONDecodeError:
            pass
    return seconds, valid


def run_distilabel_arm(n: int) -> tuple[float, int] | None:
    """distilabel forks its step processes; forked after this process has run llama.cpp, the
    step hung at 0% CPU here. So its arm runs in a fresh interpreter."""
    proc = subprocess.run([sys.executable, __file__, "--arm", "distilabel", "--passages", str(n)],
                          capture_output=True, text=True, timeout=1800)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("DISTILABEL ")), None)
    if line is None:
        raise RuntimeError(f"distilabel arm failed:\n{proc.stderr[-2000:]}")
    return json.loads(line.removeprefix("DISTILABEL "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=12)
    parser.add_argument("--arm", choices=["all", "distilabel"], default="all", help=argparse.SUPPRESS)
    args = parser.parse_args()
    texts, cfg = sample_texts(args.passages), RatchetConfig()
    n = len(texts)
    if args.arm == "distilabel":  # in a fresh process: see run_distilabel_arm
        print("DISTILABEL " + json.dumps(distilabel_pipeline(texts, cfg)))
        return
    raw_s, raw_valid, raw_tokens = raw_engine(texts, cfg)
    tmp = Path(tempfile.mkdtemp())
    try:
        build_s, summary = builder(texts, tmp)
        start = time.perf_counter()
        again = run_build(Workspace(tmp / "ws"))
        rebuild_s = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"passages: {n}   model: {cfg.annotator.model}   max_tokens: {cfg.sampling.max_tokens}", flush=True)
    build_tokens = summary["completion_tokens"]
    print(f"raw engine      : {n / raw_s:6.3f} passages/s, {raw_tokens / raw_s:5.1f} tokens/s  "
          f"({raw_s:6.1f} s, {raw_valid}/{n} valid JSON)")
    print(f"ratchet build   : {n / build_s:6.3f} passages/s, {build_tokens / build_s:5.1f} tokens/s  "
          f"({build_s:6.1f} s, {summary['accepted']}/{n} accepted, {summary['model_calls']} calls incl. retries)")
    print(f"ratio builder/raw: {raw_s / build_s:.2f} in passages/s, "
          f"{(build_tokens / build_s) / (raw_tokens / raw_s):.2f} in tokens/s   (target >= 0.9)")
    print(f"no-op rebuild   : {rebuild_s:6.2f} s = {100 * rebuild_s / build_s:.1f}% of the cold build, "
          f"{again['model_calls']} model calls (target: 0 calls, < 5%)", flush=True)
    distil = run_distilabel_arm(n)
    if distil is None:
        print("distilabel      : not installed (pip install '.[bench]' to compare)")
    else:
        distil_s, distil_valid = distil
        print(f"distilabel      : {n / distil_s:6.3f} passages/s  ({distil_s:6.1f} s, {distil_valid}/{n} valid JSON)")
        print(f"ratio builder/distilabel: {distil_s / build_s:.2f}")


if __name__ == "__main__":
    main()
