"""The ensemble build, measured side by side in one run, and whether its critics discriminate.

1. build    `ratchet build` with the default ensemble (SmolLM2 empiricist + Gemma 3 skeptic
            annotate; those two, a SmolLM2 care-ethicist and the grounding verifier critique,
            k = 2; the ratchet panel scores the kept reflections) on N sample passages, on the
            in-process llama.cpp engine (the one the replay can be compared with), every call
            that reaches the model recorded (cache hits are not: the build does not pay them);
            audit off.
2. raw      the very same requests replayed straight into llama.cpp (same prompt tokens,
            grammar, stop strings, sampling, seed): no cache, no validation, no orchestration,
            and no reading of judgement distributions (the build reads them with one extra
            forward pass per probe, so the ratio includes that cost).
3. critics  each critic member (through the scrutinize stage, retries included) on every
            accepted annotation twice: under its own passage
            ("match") and under another passage ("mismatch"). A critic that discriminates
            says `survives` more often for matches than for mismatches.

Usage: python bench/ensemble.py [--passages N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENGINE = '[annotator]\nbackend = "llama_cpp"\n'

from builder.backends.llama_cpp import LlamaCppBackend  # noqa: E402
from builder.build import run_build  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.ensemble import Ensemble  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.scrutinize import Task, critique  # noqa: E402
from builder.workspace import Workspace  # noqa: E402


def sample_texts(n: int) -> list[str]:
    rows = [json.loads(line)["text"] for line in (ROOT / "examples/corpus/passages.jsonl").read_text().splitlines()]
    return rows[:n]


def build(texts: list[str], root: Path) -> tuple[float, dict, list]:
    ws_dir = root / "ws"
    (ws_dir / "corpus").mkdir(parents=True)
    (ws_dir / "corpus/c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (ws_dir / "ratchet.toml").write_text(ENGINE + "[audit]\nrate = 0.0\n")  # the default ensemble, no audit
    calls = []
    original = LlamaCppBackend._one

    def recording(self, request):
        calls.append((self.model_path, request))
        return original(self, request)

    start = time.perf_counter()
    with mock.patch.object(LlamaCppBackend, "_one", recording):
        summary = run_build(Workspace(ws_dir))
    return time.perf_counter() - start, summary, calls


def raw_replay(calls, ensemble: Ensemble) -> tuple[float, int]:
    """Every recorded request straight into llama.cpp; returns (seconds, completion tokens)."""
    by_path = {m.backend.model_path: m.backend for m in ensemble.members}
    seconds = tokens = 0
    for path, r in calls:
        b = by_path[path]
        prompt = b.prompt_tokens(r.messages)
        start = time.perf_counter()
        out = b.llm.create_completion(prompt=prompt, max_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
                                      repeat_penalty=r.repeat_penalty, seed=r.seed, grammar=b._grammar(r.schema),
                                      stop=b._stop(r))
        seconds += time.perf_counter() - start
        tokens += out["usage"]["completion_tokens"]
    return seconds, tokens


def discrimination(ws: Workspace, ensemble: Ensemble, prompts: Prompts, cfg: RatchetConfig) -> dict[str, Counter]:
    """Each critic, through the scrutinize stage itself, on every accepted annotation under its
    own passage and under another one."""
    con = ws.connect(read_only=True)
    rows = con.execute("""SELECT p.text, a.record FROM annotations a JOIN passages p USING (passage_id)
                          WHERE a.status = 'accepted' ORDER BY a.passage_id, a.annotator""").fetchall()
    con.close()
    tasks = []
    for i, (text, record) in enumerate(rows):
        other = next((t for t, _ in rows[i + 1:] + rows[:i] if t != text), None)
        for kind, passage in (("match", text), ("mismatch", other)):
            if passage is not None:
                tasks.append(Task(kind, passage, "bench", json.loads(record)))
    out: dict[str, Counter] = {}
    for critic in ensemble.critics:
        results = critique(tasks, critic, critic.backend, prompts, cfg)
        out[critic.name] = Counter((r.passage_id, r.verdict or "invalid") for r in results)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=8)
    args = parser.parse_args()
    texts = sample_texts(args.passages)
    n = len(texts)
    tmp = Path(tempfile.mkdtemp())
    try:
        build_s, s, calls = build(texts, tmp)
        cfg = RatchetConfig.model_validate({"annotator": {"backend": "llama_cpp"}})
        with Ensemble(cfg) as ensemble:
            raw_s, raw_tokens = raw_replay(calls, ensemble)
            tally = discrimination(Workspace(tmp / "ws"), ensemble, Prompts(), cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    e = s["ensemble"]
    print(f"passages: {n}   members: {', '.join(e['members'])}   k: {e['k']}")
    print(f"model calls     : {s['model_calls']} = {s['model_calls'] / n:.1f} per passage "
          f"({s['annotations']} annotations, {e['critiques'] + e['invalid_critiques']} critiques, retries included)")
    print(f"recorded        : {len(calls)} calls reached llama.cpp ({s['cached_calls']} answered from the cache)")
    print(f"ensemble build  : {n / build_s:6.3f} passages/s, {s['completion_tokens'] / build_s:5.1f} tokens/s  ({build_s:6.1f} s)")
    print(f"raw replay      : {n / raw_s:6.3f} passages/s, {raw_tokens / raw_s:5.1f} tokens/s  ({raw_s:6.1f} s, same requests)")
    print(f"ratio build/raw : {raw_s / build_s:.2f}  (1.0 = no overhead)")
    print(f"kept            : {e['selected']}/{n} passages; verdicts {e['verdicts']}; alpha {e['agreement'].get('generation')}")
    for critic, t in tally.items():
        rate = {k: t[(k, "survives")] / max(1, sum(v for (kk, _), v in t.items() if kk == k)) for k in ("match", "mismatch")}
        print(f"critic {critic:24s}: survives {rate['match']:.0%} of matches vs {rate['mismatch']:.0%} of mismatches  "
              f"{dict(sorted(t.items()))}")


if __name__ == "__main__":
    main()
