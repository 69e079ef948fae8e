"""How far one driver scales a build on Ray, without a cluster.

A loopback OpenAI-compatible stub (bench/stub_openai.py: a fixed latency per request, as many
slots as a fleet has) stands in for the fleet. The same annotation requests (the project's
prompts and schema, distinct passages) go through the build's own path: the cache, the Ray
executor, validation, the driver's writes to DuckDB. Measured side by side in one run:

  local      the openai engine in this process (its `concurrency` requests in flight)
  ray xN     N Ray actors, each an openai engine with the same `concurrency`
  ingest     the driver alone: answers handed over at once (no engine, no Ray); what it can
             key, validate and write per second is the most any fleet can be fed by one driver

and from the ceiling, how many replicas of a given rate (--replica-rate, e.g. a vLLM replica
at 1,000 annotations/s) one driver can keep busy.

Usage: python bench/scale.py [--actors 1,2,4,8,16] [--latency 0.2] [--concurrency 8]
                             [--replica-rate 1000] [--results scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import duckdb  # noqa: E402

from builder.backends.base import Request, Response  # noqa: E402
from builder.backends.openai import OpenAIBackend, OpenAIConfig  # noqa: E402
from builder.cache import MODEL_CALLS, CachedBackend  # noqa: E402
from builder.config import ExecutorConfig  # noqa: E402
from builder.executors import LOCAL, RayExecutor, default_batch_size  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.resources import load_schema  # noqa: E402
from builder.structured import generate_valid  # noqa: E402
from overhead import sample_texts  # noqa: E402
from stub_openai import StubServer  # noqa: E402


def requests_for(n: int) -> list[Request]:
    """n distinct annotation requests: the corpus's passages, numbered so that none repeats."""
    prompts, schema, texts = Prompts(), load_schema("annotation"), sample_texts(30)
    return [Request(messages=tuple(prompts.annotation_messages(f"{texts[i % len(texts)]} (passage {i})")),
                    schema=schema, max_tokens=512, seed=1234) for i in range(n)]


def fresh_cache(folder: Path, name: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(folder / f"{name}.duckdb"))
    MODEL_CALLS.create(con)
    return con


class Timed:
    """An executor wrapper that counts the driver's time inside on_answers (key look-up done,
    validation, the cache write): busy / wall near 1 means the driver is the bottleneck."""

    def __init__(self, inner):
        self.inner, self.name, self.stage, self.busy = inner, inner.name, "bench", 0.0

    def run(self, backend, requests, on_answers):
        def timed(answers):
            start = time.perf_counter()
            on_answers(answers)
            self.busy += time.perf_counter() - start

        self.inner.run(backend, requests, timed)


class Instant:
    """Answers every request at once with a ready answer, in batches of the Ray runs' size (the
    executor's default: twice the engine's concurrency): the driver alone."""
    name, stage = "instant", "bench"

    def __init__(self, answers: list[str], batch_size: int):
        self.answers, self.batch_size = answers, batch_size

    def run(self, backend, requests, on_answers):
        ready = [(i, Response(self.answers[i % len(self.answers)], "stop", 1, 100, 0.0)) for i in range(len(requests))]
        for start in range(0, len(ready), self.batch_size):
            on_answers(ready[start:start + self.batch_size])


def through(requests: list[Request], backend, executor, con) -> tuple[float, int]:
    """(seconds, valid answers) of every request through the cache, the executor and validation."""
    engine = CachedBackend(backend, con, executor=executor)
    start = time.perf_counter()
    outcomes = generate_valid(len(requests), lambda i, attempt: requests[i], engine, retries=0)
    return time.perf_counter() - start, sum(o.record is not None for o in outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", default="1,2,4,8,16", help="actor counts to measure")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per request at the stub")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per engine (actor)")
    parser.add_argument("--per-slot", type=int, default=25, help="requests per in-flight slot in each run")
    parser.add_argument("--ingest", type=int, default=4000, help="answers for the driver-alone measurement")
    parser.add_argument("--replica-rate", type=float, default=1000.0, help="annotations/s of one fleet replica")
    parser.add_argument("--results", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    actor_counts = [int(a) for a in args.actors.split(",")]

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING",
             object_store_memory=200 * 2**20)
    folder = Path(tempfile.mkdtemp(prefix="ratchet-scale-"))
    rows, figures = [], {"latency_s": args.latency, "concurrency": args.concurrency, "cpus": os.cpu_count()}
    print(f"stub fleet: {args.latency} s per request, slots enough for every request in flight; "
          f"{args.concurrency} requests in flight per engine; {os.cpu_count()} cores", flush=True)
    with StubServer(latency_s=args.latency, slots=4096) as stub:
        cfg = OpenAIConfig(model="stub", base_url=stub.url, concurrency=args.concurrency, logprobs=False,
                           max_retries=0)
        backend = OpenAIBackend.from_config(cfg)
        backend.config = cfg  # as registry.make_backend sets it: what the actors start
        runs = [("local", 1, LOCAL)] + [
            (f"ray x{n}", n, RayExecutor(ExecutorConfig(kind="ray", concurrency=n,  # batch_size: the default
                                                        num_cpus=min(1.0, (os.cpu_count() or 1) / max(actor_counts)))))
            for n in actor_counts]
        for label, engines, executor in runs:
            capacity = engines * args.concurrency
            requests = requests_for(min(6000, max(200, args.per_slot * capacity)))
            timed = Timed(executor)
            seconds, valid = through(requests, backend, timed, fresh_cache(folder, label.replace(" ", "")))
            executor.close()  # as a build ends: its actors give their CPUs back for the next run
            row = {"run": label, "engines": engines, "in_flight": capacity, "requests": len(requests),
                   "valid": valid, "seconds": round(seconds, 2), "per_s": round(len(requests) / seconds, 1),
                   "ideal_per_s": round(capacity / args.latency, 1),
                   "driver_busy": round(timed.busy / seconds, 3)}
            rows.append(row)
            print(f"{label:>8}: {row['requests']:5d} requests in {seconds:6.1f} s = {row['per_s']:7.1f}/s "
                  f"(ideal {row['ideal_per_s']:7.1f}/s, {row['per_s'] / row['ideal_per_s']:.0%}); "
                  f"driver busy {row['driver_busy']:.0%}; {valid} valid", flush=True)
        answers = [stub.answer(backend.payload(r))["choices"][0]["message"]["content"] for r in requests_for(50)]
    requests = requests_for(args.ingest)
    ingest = {}
    for label, batch in (("one at a time", 1), ("batches", default_batch_size(cfg))):
        seconds, valid = through(requests, backend, Instant(answers, batch), fresh_cache(folder, f"ingest{batch}"))
        ingest[label] = {"batch": batch, "answers": len(requests), "seconds": round(seconds, 2),
                         "per_s": round(len(requests) / seconds, 1)}
        print(f"  ingest: {len(requests)} answers keyed, validated and written by the driver, {batch} a write, in "
              f"{seconds:.1f} s = {len(requests) / seconds:.0f}/s ({valid} valid)", flush=True)
    ceiling = ingest["batches"]["per_s"]
    figures.update(runs=rows, ingest=ingest,
                   replica_rate=args.replica_rate, replicas_one_driver_feeds=round(ceiling / args.replica_rate, 2))
    print(f"\none driver validates and writes at most {ceiling:.0f} answers/s: it keeps "
          f"{ceiling / args.replica_rate:.1f} replica(s) of {args.replica_rate:g} annotations/s busy "
          f"(the model: fleet throughput = min(replicas x replica rate, driver ceiling))")
    if args.results:
        args.results.write_text(json.dumps(figures, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
