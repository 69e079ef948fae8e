"""The embedded engines on one annotation job, side by side.

Job: short claims, the sample corpus (30 passages) and long documents (~3,000 characters,
made of sample passages), each with the real annotation prompt (system, few-shot turns,
datamarked passage) and schema, greedy decoding, the default output budget. Arms:

  in-process   llama.cpp through llama-cpp-python, one request at a time (backend llama_cpp)
  server-1     the managed llama-server with 1 slot (backend llama_server, slots = 1)
  server-N     the managed llama-server with N slots, N requests in flight
  replicas-R   R managed llama-servers side by side (llama_server.replicas = R), each with one
               slot and its share of the threads (one each on 2 cores)
  distilabel   distilabel 1.5.3's LlamaCppLLM + ChatGeneration pipeline on the same messages,
               schema and sampling (`pip install '.[bench]'`), in a fresh interpreter

It prints requests/s, completion tokens/s, the share of outputs that are valid (parse and
follow the schema, not cut off), the ratios, and how many outputs of each server arm are
identical to the in-process ones and to each other.

Usage: python bench/engines.py [--slots N] [--replicas R]
       [--arms in-process,server-1,server-N,replicas-R,distilabel]
       [--results FILE.json]   (arms already in FILE are not run again: run them one by one)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from builder.backends.base import Request, Response  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.models import resolve_model  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.resources import load_schema  # noqa: E402
from builder.structured import check_output, validator_for  # noqa: E402

SHORT_CLAIMS = [
    "The city council says the new bridge cut commuting times by 40 percent, but it has published no data.",
    "Everyone I know loves the new phone, so it must be the best phone ever made.",
    "A hospital must decide whether to give its last ventilator to the youngest patient or the sickest one.",
    "Analysts predict that electric cars will outsell petrol cars within five years.",
]
LONG_CHARS = 3000


def job_texts() -> list[str]:
    """Short claims, the sample corpus, then long documents made of consecutive sample passages."""
    sample = [json.loads(line)["text"] for line in (ROOT / "examples/corpus/passages.jsonl").read_text().splitlines()]
    longs, current = [], []
    for text in sample:
        current.append(text)
        if sum(len(t) + 2 for t in current) >= LONG_CHARS:
            longs.append("\n\n".join(current)[:LONG_CHARS])
            current = []
    return SHORT_CLAIMS + sample + longs


def job_requests(cfg: RatchetConfig, limit: int = 0) -> list[Request]:
    prompts, schema, s = Prompts(), load_schema("annotation"), cfg.sampling
    texts = job_texts()
    texts = texts[:limit] + texts[-1:] if limit else texts  # a subset keeps a long document
    return [Request(messages=prompts.annotation_messages(t), schema=schema, max_tokens=s.max_tokens, temperature=0.0,
                    top_p=s.top_p, repeat_penalty=s.repeat_penalty, seed=s.seed) for t in texts]


def count_valid(texts: list[str]) -> int:
    """Outputs the build would keep: parsed, schema-valid, judged as the build judges them (a
    string the grammar stopped at its maxLength is trimmed, the annotate.at_length_bound default)."""
    validator = validator_for(load_schema("annotation"))
    at_bound = RatchetConfig().annotate.at_length_bound
    return sum(check_output(Response(t, "stop"), validator, at_bound)[0] is not None for t in texts)


def summarize(name: str, seconds: float, texts: list[str], tokens: int, valid: int) -> dict:
    return {"arm": name, "seconds": round(seconds, 2), "requests": len(texts), "completion_tokens": tokens,
            "valid": valid, "outputs": texts}


def run_backend(name: str, backend, requests: list[Request]) -> dict:
    start = time.perf_counter()
    responses: list[Response] = backend.generate(requests)
    seconds = time.perf_counter() - start
    valid = count_valid([r.text for r in responses])  # as report() judges the stored outputs
    errors = [r.error for r in responses if r.finish_reason == "error"]
    if errors:
        print(f"{name}: {len(errors)} error(s), first: {errors[0]}", file=sys.stderr)
    return summarize(name, seconds, [r.text for r in responses], sum(r.completion_tokens for r in responses), valid)


def arm_in_process(cfg: RatchetConfig, requests: list[Request]) -> dict:
    from builder.backends.llama_cpp import LlamaCppBackend

    with LlamaCppBackend(resolve_model(cfg.annotator.model), n_ctx=cfg.annotator.n_ctx) as backend:
        return run_backend("in-process", backend, requests)


def arm_server(cfg: RatchetConfig, requests: list[Request], slots: int) -> dict:
    from builder.backends.llama_server import LlamaServerBackend, find_binary

    found = find_binary(cfg.annotator.server_binary)
    if found.path is None:
        raise SystemExit(f"server arms need llama-server: {found.source}")
    with LlamaServerBackend(resolve_model(cfg.annotator.model), found.path, n_ctx=cfg.annotator.n_ctx,
                            slots=slots) as backend:
        # Warm the server as the in-process engine is warm after loading: one tiny request.
        backend.generate([Request(messages=({"role": "user", "content": "hi"},), max_tokens=1)])
        return run_backend(f"server-{slots}", backend, requests)


def arm_replicas(cfg: RatchetConfig, requests: list[Request], replicas: int) -> dict:
    from builder.backends import registry
    from builder.backends.llama_server import find_binary, load

    if find_binary(cfg.annotator.server_binary).path is None:
        raise SystemExit("the replicas arm needs llama-server")
    engine = registry.parse({"backend": "llama_server", "model": cfg.annotator.model, "n_ctx": cfg.annotator.n_ctx,
                             "slots": 1, "replicas": replicas})
    with load(engine) as backend:
        backend.generate([Request(messages=({"role": "user", "content": "hi"},), max_tokens=1)] * replicas)  # warm each
        return run_backend(f"replicas-{replicas}", backend, requests)


def arm_distilabel(cfg: RatchetConfig) -> dict | None:
    """distilabel forks its step processes; forked after this process has run llama.cpp, the
    step hung at 0% CPU (see bench/overhead.py). So its arm runs in a fresh interpreter."""
    proc = subprocess.run([sys.executable, __file__, "--arms", "distilabel-child",
                           "--repeat-penalty", str(cfg.sampling.repeat_penalty)], capture_output=True, text=True,
                          timeout=3600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("DISTILABEL ")), None)
    if line is None:
        raise RuntimeError(f"distilabel arm failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("DISTILABEL "))


def distilabel_child(cfg: RatchetConfig) -> dict | None:
    try:
        from distilabel.models import LlamaCppLLM
        from distilabel.pipeline import Pipeline
        from distilabel.steps import LoadDataFromDicts
        from distilabel.steps.tasks import ChatGeneration
    except ImportError:
        return None
    requests = job_requests(cfg, int(os.environ.get("BENCH_LIMIT", "0")))
    r0 = requests[0]
    rows = [{"messages": list(r.messages)} for r in requests]
    llm = LlamaCppLLM(model_path=str(resolve_model(cfg.annotator.model)), n_ctx=cfg.annotator.n_ctx, n_batch=512,
                      extra_kwargs={"n_threads": os.cpu_count()},
                      generation_kwargs={"max_new_tokens": r0.max_tokens, "temperature": r0.temperature, "top_p": r0.top_p,
                                         "extra_generation_kwargs": {"response_format": {"type": "json_object",
                                                                                         "schema": r0.schema},
                                                                     "repeat_penalty": r0.repeat_penalty, "seed": r0.seed}})
    with Pipeline(name="ratchet-engines-bench") as pipeline:
        LoadDataFromDicts(data=rows) >> ChatGeneration(llm=llm, input_batch_size=len(rows))
    start = time.perf_counter()
    distiset = pipeline.run(use_cache=False)
    seconds = time.perf_counter() - start
    train = distiset["default"]["train"]
    texts = [t or "" for t in train["generation"]]
    valid = count_valid(texts)
    # distilabel keeps no token counts for this LLM: count the outputs with the model's tokenizer.
    import contextlib
    import io

    from llama_cpp import Llama

    with contextlib.redirect_stderr(io.StringIO()):
        vocab = Llama(model_path=str(resolve_model(cfg.annotator.model)), vocab_only=True, n_ctx=64, verbose=False)
    tokens = sum(len(vocab.tokenize(t.encode("utf-8"), add_bos=False, special=False)) for t in texts)
    return summarize("distilabel", seconds, texts, tokens, valid)


def same(a: dict, b: dict) -> int:
    return sum(x == y for x, y in zip(a["outputs"], b["outputs"]))


def report(results: dict[str, dict], slots: int, replicas: int = 2) -> None:
    base = results.get("in-process")
    distil = results.get("distilabel")
    n = next(iter(results.values()))["requests"] if results else 0
    print(f"job: {n} requests (short claims, the sample corpus, {LONG_CHARS}-character documents), "
          "annotation prompt and schema, greedy, SmolLM2-135M Q4_1")
    print("| arm | requests/s | completion tokens/s | valid | × in-process | × distilabel |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in ["in-process", "server-1", f"server-{slots}", f"replicas-{replicas}", "distilabel"]:
        r = results.get(name)
        if r is None:
            continue
        rps = r["requests"] / r["seconds"]
        tps = f"{r['completion_tokens'] / r['seconds']:.1f}" if r["completion_tokens"] else "–"
        vs_base = f"{rps / (base['requests'] / base['seconds']):.2f}" if base else "–"
        vs_distil = f"{rps / (distil['requests'] / distil['seconds']):.2f}" if distil else "–"
        valid = count_valid(r["outputs"])  # judged again: results kept from an older run meet today's rule
        print(f"| {name} | {rps:.3f} | {tps} | {valid}/{r['requests']} | {vs_base} | {vs_distil} |")
    pairs = [("server-1", "in-process"), (f"server-{slots}", "server-1"), (f"server-{slots}", "in-process"),
             (f"replicas-{replicas}", "server-1"), (f"replicas-{replicas}", "in-process"), ("distilabel", "in-process")]
    for a, b in pairs:
        if a in results and b in results:
            print(f"identical outputs {a} vs {b}: {same(results[a], results[b])}/{results[a]['requests']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2, help="servers side by side in the replicas arm")
    parser.add_argument("--arms", default="in-process,server-1,server-N,replicas-R,distilabel")
    parser.add_argument("--results", type=Path, help="keep results here; arms already in it are not run again")
    parser.add_argument("--repeat-penalty", type=float, default=None,
                        help="default: sampling.repeat_penalty (1.1); 1.0 turns it off (for the identity check)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N texts (and the last long document)")
    args = parser.parse_args()
    cfg = RatchetConfig()
    if args.repeat_penalty is not None:
        cfg.sampling.repeat_penalty = args.repeat_penalty
    if args.limit:
        os.environ["BENCH_LIMIT"] = str(args.limit)
    if args.arms == "distilabel-child":
        print("DISTILABEL " + json.dumps(distilabel_child(cfg)))
        return
    results: dict[str, dict] = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    requests = job_requests(cfg, args.limit)
    for arm in args.arms.split(","):
        name = {"server-N": f"server-{args.slots}", "replicas-R": f"replicas-{args.replicas}"}.get(arm, arm)
        if name in results:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        if arm == "in-process":
            result = arm_in_process(cfg, requests)
        elif arm == "server-1":
            result = arm_server(cfg, requests, 1)
        elif arm == "server-N":
            result = arm_server(cfg, requests, args.slots)
        elif arm == "replicas-R":
            result = arm_replicas(cfg, requests, args.replicas)
        elif arm == "distilabel":
            result = arm_distilabel(cfg)
            if result is None:
                print("distilabel: not installed (pip install '.[bench]')", file=sys.stderr)
                continue
        else:
            raise SystemExit(f"unknown arm {arm}")
        results[name] = result
        if args.results:
            args.results.write_text(json.dumps(results))
    report(results, args.slots, args.replicas)


if __name__ == "__main__":
    main()
