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


def raw_engine(texts, cfg: RatchetConfig) -> tuple[float, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(resolve_model(cfg.annotator.model)), n_ctx=cfg.annotator.n_ctx,
                n_threads=os.cpu_count(), n_batch=512, verbose=False)
    prompts, schema, s = Prompts(), load_schema("annotation"), cfg.sampling
    valid = 0
    start = time.perf_counter()
    for text in texts:
        out = llm.create_chat_completion(
            messages=list(prompts.annotation_messages(text)), max_tokens=s.max_tokens, temperature=s.temperature,
            top_p=s.top_p, repeat_penalty=s.repeat_penalty, seed=s.seed,
            response_format={"type": "json_object", "schema": schema})
        try:
            json.loads(out["choices"][0]["message"]["content"])
            valid += out["choices"][0]["finish_reason"] == "stop"
        except json.JSONDecodeError:
            pass
    seconds = time.perf_counter() - start
    llm.close()
    return seconds, valid


def builder(texts, root: Path) -> tuple[float, dict]:
    ws_dir = root / "ws"
    (ws_dir / "corpus").mkdir(parents=True)
    (ws_dir / "corpus/c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (ws_dir / "ratchet.toml").write_text("")
    start = time.perf_counter()
    summary = run_build(Workspace(ws_dir))
    return time.perf_counter() - start, summary


def distilabel_pipeline(texts, cfg: RatchetConfig) -> float | None:
    try:
        from distilabel.models import LlamaCppLLM
        from distilabel.pipeline import Pipeline
        from distilabel.steps import LoadDataFromDicts
        from distilabel.steps.tasks import TextGeneration
    except ImportError:
        return None
    prompts, schema, s = Prompts(), load_schema("annotation"), cfg.sampling
    system, _ = prompts.annotation_messages("x")
    rows = [{"instruction": prompts.annotation_messages(t)[1]["content"]} for t in texts]
    with Pipeline(name="ratchet-bench") as pipeline:
        load = LoadDataFromDicts(data=rows)
        gen = TextGeneration(
            system_prompt=system["content"],
            llm=LlamaCppLLM(model_path=str(resolve_model(cfg.annotator.model)), n_ctx=cfg.annotator.n_ctx,
                            structured_output={"format": "json", "schema": schema},
                            generation_kwargs={"max_new_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}),
            input_batch_size=len(rows))
        load >> gen
    start = time.perf_counter()
    pipeline.run(use_cache=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=12)
    args = parser.parse_args()
    texts, cfg = sample_texts(args.passages), RatchetConfig()
    n = len(texts)
    raw_s, raw_valid = raw_engine(texts, cfg)
    tmp = Path(tempfile.mkdtemp())
    try:
        build_s, summary = builder(texts, tmp)
        start = time.perf_counter()
        again = run_build(Workspace(tmp / "ws"))
        rebuild_s = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    distil_s = distilabel_pipeline(texts, cfg)
    print(f"passages: {n}   model: {cfg.annotator.model}   max_tokens: {cfg.sampling.max_tokens}")
    print(f"raw engine      : {n / raw_s:6.3f} passages/s  ({raw_s:6.1f} s, {raw_valid}/{n} valid JSON)")
    print(f"ratchet build   : {n / build_s:6.3f} passages/s  ({build_s:6.1f} s, {summary['accepted']}/{n} accepted, "
          f"{summary['model_calls']} calls incl. retries)")
    print(f"ratio builder/raw: {raw_s / build_s:.2f}   (target >= 0.9)")
    print(f"no-op rebuild   : {rebuild_s:6.2f} s = {100 * rebuild_s / build_s:.1f}% of the cold build, "
          f"{again['model_calls']} model calls (target: 0 calls, < 5%)")
    if distil_s is None:
        print("distilabel      : not installed (pip install '.[bench]' to compare)")
    else:
        print(f"distilabel      : {n / distil_s:6.3f} passages/s  ({distil_s:6.1f} s); ratio builder/distilabel: {distil_s / build_s:.2f}")


if __name__ == "__main__":
    main()
