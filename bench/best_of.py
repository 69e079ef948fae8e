"""What does sampling N candidates per passage buy (annotate.best_of, issue 29 scope 4)?

The default writer (the first annotating member of the default ensemble, with its few-shot
setting) annotates the bundled corpus under the default config (gates on, retries), one
candidate index at a time through one call cache: candidate 0 (the request of best_of = 1),
then candidate 1, then candidate 2, each pass timed. N = 1, 2, 3 keep, per passage, the best of
their first N candidates, chosen by the build's own rule (builder/stages/annotate.py: choose),
and cost the sum of their passes' seconds. Sampling the N candidates in one batch, as a build
does, can be a little faster where the engine has free slots.

Printed per N: seconds, passages that keep a reflection, verified claims kept, words of the
kept text the passage never uses, kept reflections per minute, and the passages whose kept
reflection differs from N = 1's. Passing the gates is not being faithful: with
`--for-reading F`, every distinct kept reflection is written once, shuffled, without saying
which N kept it, for a person to label claim by claim (docs/faithfulness.md reports those
labels). With `--labels F` (JSONL of {"id", "faithful": true|false}), faithful kept
reflections per minute are printed for each N.

Does the rule choose the faithful candidate? `--candidates F` writes every sample that passed
the gates, of the passages where two or more distinct ones did, shuffled, for the same reading;
with labels covering them, the bench prints how often the kept one was faithful where the
passage's samples differ in faithfulness (issue 29's target: 90%). `--workspace DIR` keeps the
call cache in DIR (a rerun over the same prompts makes no model call).

Usage: python bench/best_of.py [--passages 30] [--n 3] [--writer MODEL] [--results F.json] [--for-reading F.jsonl]
                               [--candidates F.jsonl] [--workspace DIR]
       python bench/best_of.py --results F.json --labels L.jsonl   # reprint with labels, no model
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder import faithfulness  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.corpus import Passage, passage_id  # noqa: E402
from builder.evaluate import cached_engine  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.annotate import AnnotateTask, Candidate, choose  # noqa: E402
from builder.stages.base import run_task  # noqa: E402
from builder.workspace import Workspace  # noqa: E402


def passages(n: int) -> list[Passage]:
    rows = [json.loads(line)["text"] for line in (ROOT / "examples/corpus/passages.jsonl").read_text().splitlines()]
    return [Passage(passage_id(text), "bench", i, text, len(text.split())) for i, text in enumerate(rows[:n])]


def sample(items: list[Passage], n: int, writer: str | None = None,
           workspace: Path | None = None) -> tuple[list[list], list[float], str]:
    """Every passage's candidates 0..n-1 (rows as the task gives them), each index's seconds."""
    cfg = RatchetConfig()
    member = next(m for m in cfg.ensemble.members if "annotate" in m.roles and m.kind == "model")
    if writer:  # another model in the default writer's place (its persona and few-shot setting)
        member = member.model_copy(update={"model": writer, "name": ""})
    root = workspace or Path(tempfile.mkdtemp(prefix="best-of-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratchet.toml").write_text("")
    con = Workspace(root).connect()
    rows, seconds = [], []
    try:
        with cached_engine(con, member.engine(cfg.annotator), member.display_name) as engine:
            task = AnnotateTask(Prompts(), cfg, 1, member.display_name, member.persona, member.temperature,
                                member.few_shot)
            for k in range(n):
                start = time.perf_counter()
                rows.append(run_task(task, [Candidate(p, k) for p in items], engine))
                seconds.append(time.perf_counter() - start)
                why = Counter((r.reason or "").split(":")[0] for r in rows[-1] if r.status != "accepted")
                print(f"candidate {k}: {seconds[-1]:.0f} s, {sum(r.status == 'accepted' for r in rows[-1])} "
                      f"of {len(items)} pass the gates; rejected: {dict(why)}", flush=True)
    finally:
        con.close()
    return rows, seconds, member.display_name


def record_id(passage: str, record: dict) -> str:
    return hashlib.sha256(json.dumps([passage, record], sort_keys=True).encode()).hexdigest()[:12]


def kept_by_n(items: list[Passage], rows: list[list], seconds: list[float]) -> dict:
    texts = {p.passage_id: p.text for p in items}
    out = {}
    for n in range(1, len(rows) + 1):
        chosen = choose([copy.deepcopy(r) for k in range(n) for r in rows[k]], texts)
        kept = [r for r in chosen if r.status == "accepted"]
        out[n] = {"seconds": round(sum(seconds[:n]), 1), "passages": len(items), "kept": len(kept),
                  "claims": sum(len(r.record["claims"]) for r in kept),
                  "unsupported_words": sum(len(faithfulness.foreign_words(t, texts[r.passage_id]))
                                           for r in kept for t in faithfulness.record_texts(r.record)),
                  "kept_per_min": round(60 * len(kept) / sum(seconds[:n]), 2),
                  "reflections": {r.passage_id: {"candidate": r.candidate, "record": r.record,
                                                 "id": record_id(texts[r.passage_id], r.record)} for r in kept}}
    first = out[1]["reflections"]
    for r in out.values():
        r["differs_from_n1"] = sum(first.get(pid, {}).get("id") != x["id"] for pid, x in r["reflections"].items())
    out[len(rows)]["samples"] = {p.passage_id: [{"candidate": k, "record": r.record,
                                                  "id": record_id(p.text, r.record)}
                                                 for k in range(len(rows)) for r in rows[k]
                                                 if r.passage_id == p.passage_id and r.status == "accepted"]
                                 for p in items}
    return out


def candidates_for_reading(items: list[Passage], results: dict, path: Path) -> int:
    """Every accepted sample of the passages whose accepted samples differ, once, shuffled."""
    texts = {p.passage_id: p.text for p in items}
    rows = {x["id"]: {"id": x["id"], "passage": texts[pid], "reflection": x["record"]}
            for pid, samples in results[max(results)]["samples"].items()
            if len({x["id"] for x in samples}) > 1 for x in samples}
    rows = list(rows.values())
    random.Random(1).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def selection(results: dict, labels: dict[str, bool]) -> str | None:
    """Of the passages whose accepted samples differ in faithfulness (every one read), how often
    N's kept one is faithful, for each N > 1."""
    samples = results[max(results)].get("samples")
    if not samples:
        return None
    lines = []
    for n, r in results.items():
        if n == 1:
            continue
        first_n = {pid: [x["id"] for x in xs if x["candidate"] < n] for pid, xs in samples.items()}
        mixed = [pid for pid, ids in first_n.items()
                 if all(i in labels for i in ids) and len({labels[i] for i in ids}) == 2]
        right = sum(labels[r["reflections"][pid]["id"]] for pid in mixed)
        lines.append(f"N = {n}: the kept sample is faithful in {right} of {len(mixed)} passages whose samples "
                     f"differ in faithfulness")
    return "\n".join(lines)


def for_reading(items: list[Passage], results: dict, path: Path) -> int:
    """Every distinct kept reflection once, shuffled, with its passage and nothing about N."""
    texts = {p.passage_id: p.text for p in items}
    seen = {}
    for r in results.values():
        for pid, x in r["reflections"].items():
            seen.setdefault(x["id"], {"id": x["id"], "passage": texts[pid], "reflection": x["record"]})
    rows = list(seen.values())
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def table(results: dict, labels: dict[str, bool] | None) -> None:
    head = "| N | s | passages keeping one | verified claims | unsupported words | kept per min | differ from N=1 |"
    if labels:
        head += " faithful kept | faithful per min |"
    print(head)
    print("|" + " ---: |" * (head.count("|") - 1))
    for n, r in results.items():
        line = (f"| {n} | {r['seconds']:.0f} | {r['kept']} of {r['passages']} | {r['claims']} | "
                f"{r['unsupported_words']} | {r['kept_per_min']} | {r['differs_from_n1']} |")
        if labels:
            ids = [x["id"] for x in r["reflections"].values()]
            known = [labels[i] for i in ids if i in labels]
            faithful = sum(known)
            line += (f" {faithful} of {len(ids)}{'' if len(known) == len(ids) else f' ({len(ids) - len(known)} unread)'}"
                     f" | {60 * faithful / r['seconds']:.2f} |")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=30)
    parser.add_argument("--n", type=int, default=3, help="the largest N (candidates per passage)")
    parser.add_argument("--writer", help="a model in the default writer's place, e.g. bundled:qwen2.5-coder-1.5b")
    parser.add_argument("--results", type=Path, help="write (or, with --labels alone, read) the results here")
    parser.add_argument("--for-reading", type=Path, help="every distinct kept reflection, shuffled, for labelling")
    parser.add_argument("--labels", type=Path, help='JSONL of {"id", "faithful"}: a person\'s reading')
    parser.add_argument("--candidates", type=Path, help="every accepted sample where they differ, for labelling")
    parser.add_argument("--workspace", type=Path, help="keep the call cache here (a rerun makes no model call)")
    args = parser.parse_args()
    labels = ({(x := json.loads(line))["id"]: bool(x["faithful"]) for line in args.labels.read_text().splitlines()
               if line.strip()} if args.labels else None)
    if labels is not None and args.results and args.results.exists():
        results = {int(k): v for k, v in json.loads(args.results.read_text())["by_n"].items()}
    else:
        items = passages(args.passages)
        rows, seconds, writer = sample(items, args.n, args.writer, args.workspace)
        results = kept_by_n(items, rows, seconds)
        print(f"\nwriter {writer}, {len(items)} passages, default config (gates, retries), 2 cores:\n")
        if args.results:
            args.results.write_text(json.dumps({"writer": writer, "by_n": results}, indent=1))
        if args.for_reading:
            print(f"{for_reading(items, results, args.for_reading)} distinct kept reflections to read: "
                  f"{args.for_reading}\n")
        if args.candidates:
            print(f"{candidates_for_reading(items, results, args.candidates)} accepted samples of passages whose "
                  f"samples differ, to read: {args.candidates}\n")
    table(results, labels)
    if labels and (chosen := selection(results, labels)):
        print("\n" + chosen)


if __name__ == "__main__":
    main()
