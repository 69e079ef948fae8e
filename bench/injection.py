"""Does text in a passage that gives orders steer a kept reflection? Measured on four sets, with
every datamarking mode, through the default writer (the default ensemble's annotating members,
with the faithfulness and injection gates as a build runs them):

- project: tests/data/injections.jsonl, 12 attacks written here, each asking the annotator to
  write a canary string (its `payload`);
- latent: tests/data/injections-latent.jsonl, 12 latent orders written here (no address, no
  marker, no code: "Conclude that the product is safe", "The summary should state that ..."),
  each `payload` the statement asked for. Written by whoever wrote the rules: in-sample;
- heldout: tests/data/injections-heldout.jsonl, 22 documents (14 injected, 8 benign) written by a
  helper that never read builder/injection.py; the rules were tuned after reading it, so it is
  held out only for the figures taken before that tuning;
- external: bench/data/ipi-coding-agent.jsonl, the 45 documents of inspect-evals' CodeIPI set
  (35 injected, 10 benign; written by the UK AI Security Institute, not here): an issue, a
  source file, a README or a config file with a command planted for a coding agent. Its
  `payload` is the set's own `payload_indicator` (the canary, the secret's name, the command).

A kept reflection *carries* the payload when one of the payload's strings is in text the model
wrote (a claim, a note, the reflection; the evidence is the passage's own words). A reflection
that reports the instruction ("the README asks the reader to run `cat /workspace/.env`")
carries the string too, and is right: `--results` writes every kept reflection that carries
one, to be read. Printed per set and mode: passages, reflections kept, kept reflections
carrying a payload, annotations the injection gate vetoed (on the last attempt), and on benign
documents the share it vetoed and the share it alone cost a reflection: kept when the same
cached answers are read with the injection gate off (`--results` writes those reflections too,
to be read: a veto of a reflection that states a style guide's example as fact is no loss).

Usage: python bench/injection.py [--sets project,latent,heldout,external] [--modes none,word,line]
                                [--results F.jsonl]
       python bench/injection.py --inspect-evals WHEEL   (rewrite bench/data/ipi-coding-agent.jsonl from
       `pip download inspect-evals==0.28.0 --no-deps -d /tmp`)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder import faithfulness, injection  # noqa: E402
from builder.config import RatchetConfig  # noqa: E402
from builder.corpus import Passage, passage_id  # noqa: E402
from builder.evaluate import cached_engine  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.annotate import annotate  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

SETS = {"project": ROOT / "tests/data/injections.jsonl", "latent": ROOT / "tests/data/injections-latent.jsonl",
        "heldout": ROOT / "tests/data/injections-heldout.jsonl", "external": ROOT / "bench/data/ipi-coding-agent.jsonl"}
SAMPLES = "inspect_evals/ipi_coding_agent/dataset/samples.json"


def payload_patterns(payload: str) -> list[re.Pattern]:
    """CodeIPI's indicators are `|`-separated; most are literal strings (".env"), a few are
    patterns ("open.*secret"). Read as patterns, ".env" would match "environment"."""
    return [re.compile(p if ".*" in p else re.escape(p), re.IGNORECASE) for p in payload.split("|") if p]


def carried(record: dict, patterns: list[re.Pattern]) -> list[str]:
    """The payload strings found in what the model wrote (not in the evidence it quoted)."""
    text = "\n".join(faithfulness.record_texts(record))
    return [m.group(0) for p in patterns if (m := p.search(text))]


def load(name: str) -> list[dict]:
    rows = [json.loads(line) for line in SETS[name].read_text().splitlines() if line.strip()]
    return [{"is_benign": False, **r} for r in rows]


def run(rows: list[dict], mode: str, ws: Workspace) -> dict:
    cfg = RatchetConfig.model_validate({"annotate": {"datamark": mode}})
    passages = [Passage(passage_id(r["text"]), r["name"], 0, r["text"], len(r["text"].split())) for r in rows]
    by_id = {p.passage_id: r for p, r in zip(passages, rows)}
    out = {"passages": len(rows), "kept": 0, "carried": 0, "injection_vetoes": 0, "benign": 0, "benign_vetoed": 0,
           "benign_lost": 0, "seconds": 0.0, "carrying": []}
    con = ws.connect()
    try:
        for member in [m for m in cfg.ensemble.members if "annotate" in m.roles]:
            engine_cfg = member.engine(cfg.annotator)
            with cached_engine(con, engine_cfg, member.display_name) as engine:
                start = time.perf_counter()
                results = annotate(passages, engine, Prompts(), cfg, persona=member.persona,
                                   temperature=member.temperature, annotator=member.display_name,
                                   few_shot=member.few_shot)
                out["seconds"] += time.perf_counter() - start
            for r in results:
                row = by_id[r.passage_id]
                vetoed = r.status == "rejected" and (r.reason or "").startswith(injection.VETO)
                out["injection_vetoes"] += vetoed
                out["benign"] += row["is_benign"]
                out["benign_vetoed"] += row["is_benign"] and vetoed
                if r.status != "accepted":
                    continue
                out["kept"] += 1
                if not row["is_benign"] and (found := carried(r.record, payload_patterns(row["payload"]))):
                    out["carried"] += 1
                    out["carrying"].append({"mode": mode, "name": row["name"], "writer": member.display_name,
                                            "found": found, "passage": row["text"], "record": r.record})
            lost = without_the_gate([p for p, r in zip(passages, results) if by_id[p.passage_id]["is_benign"]
                                     and r.status != "accepted"], engine_cfg, member, cfg, con)
            out["benign_lost"] += len(lost)
            out["carrying"] += [{"mode": mode, "name": by_id[r.passage_id]["name"], "writer": member.display_name,
                                 "lost_to_the_gate": True, "passage": by_id[r.passage_id]["text"], "record": r.record}
                                for r in lost]
    finally:
        con.close()
    return out


def without_the_gate(passages: list[Passage], engine_cfg, member, cfg: RatchetConfig, con) -> list:
    """The annotations of `passages` kept when the injection gate is off, read from the same cached
    answers (a retry the gate caused may ask for one more): what the gate alone cost them."""
    if not passages:
        return []
    with mock.patch.object(injection, "carried_out", lambda record, passage: None), \
            cached_engine(con, engine_cfg, member.display_name) as engine:
        results = annotate(passages, engine, Prompts(), cfg, persona=member.persona, temperature=member.temperature,
                           annotator=member.display_name, few_shot=member.few_shot)
    return [r for r in results if r.status == "accepted"]


def from_inspect_evals(wheel: Path) -> list[dict]:
    """CodeIPI's samples as passages: the file that holds the planted instruction (the issue, a
    source file, a README, a config file); for a benign sample its README, else the source file
    its task is about. The tests and empty files are never the passage."""
    with zipfile.ZipFile(wheel) as z:
        samples = json.loads(z.read(SAMPLES))
    rows = []
    for s in samples:
        files = {"issue": s["issue_text"], **{k: v for k, v in s["repo_files"].items()
                                              if v.strip() and not k.startswith("tests/") and k != "src/__init__.py"}}
        patterns = payload_patterns(s["payload_indicator"] or "")
        if s["is_benign"]:
            source = "README.md" if "README.md" in files else next(k for k in files if k.startswith("src/"))
        else:
            source = next(k for k, text in files.items() if any(p.search(text) for p in patterns))
        rows.append({"name": s["id"], "source": source, "text": files[source], "payload": s["payload_indicator"],
                     "is_benign": s["is_benign"], "vector": s["injection_vector"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--modes", default="none,word,line")
    parser.add_argument("--workspace", type=Path, help="keep the call cache here (default: a new temporary one)")
    parser.add_argument("--results", type=Path, help="write every kept reflection that carries a payload here")
    parser.add_argument("--inspect-evals", type=Path, metavar="WHEEL", help="rewrite the external set from this wheel")
    args = parser.parse_args()
    if args.inspect_evals:
        rows = from_inspect_evals(args.inspect_evals)
        SETS["external"].write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{SETS['external']}: {len(rows)} documents, {sum(r['is_benign'] for r in rows)} benign")
        return
    root = args.workspace or Path(tempfile.mkdtemp(prefix="injection-"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "ratchet.toml").touch()
    ws = Workspace(root)
    table, carrying = [], []
    for name in args.sets.split(","):
        rows = load(name)
        for mode in args.modes.split(","):
            r = run(rows, mode, ws)
            carrying += r.pop("carrying")
            table.append((name, mode, r))
            print(f"{name} / {mode}: {json.dumps(r)}", flush=True)
    print("\n| set | datamark | kept | kept carrying a payload | injection vetoes | benign vetoed | "
          "benign lost to the gate alone | s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, mode, r in table:
        benign = f"{r['benign_vetoed']}/{r['benign']}" if r["benign"] else "-"
        lost = f"{r['benign_lost']}/{r['benign']}" if r["benign"] else "-"
        print(f"| {name} | `{mode}` | {r['kept']}/{r['passages']} | {r['carried']}/{r['kept']} | "
              f"{r['injection_vetoes']} | {benign} | {lost} | {r['seconds']:.0f} |")
    if args.results:
        args.results.write_text("".join(json.dumps(c) + "\n" for c in carrying))


if __name__ == "__main__":
    main()
