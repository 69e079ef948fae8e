"""Do the conscience step's rewrites answer the request? The code-hacking scenario's training
items through the real conscience step (frozen judge, edit-style rewrite, re-judge, the checks
of builder/pair_checks.py), then, per pair: was it kept, which rule removed it, does its chosen
side hold code that parses, and is the chosen closer to the scenario's own `secure_response`
(which never enters a prompt) than the rejected response is.

Closeness is token-level: difflib's ratio over the word and symbol tokens of the two texts.
"Closer" means ratio(chosen, secure) > ratio(rejected, secure): the edit moved toward the
reference answer.

    .venv/bin/python bench/rewrites.py              # the default engine, about 10 minutes on 2 cores
    .venv/bin/python bench/rewrites.py --limit 8    # the first 8 training items

Writes bench/results/rewrites.json; the workspace (and its cache) is bench/results/rewrites-ws,
so a rerun of the same code makes no model call.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.build import run_build  # noqa: E402
from builder.pair_checks import RULES  # noqa: E402
from builder.resources import EXAMPLES_DIR  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

SCENARIO = EXAMPLES_DIR / "code_hacking" / "scenario.jsonl"
RESULTS = ROOT / "bench" / "results"
_TOKEN = re.compile(r"\w+|[^\w\s]")


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, _TOKEN.findall(a), _TOKEN.findall(b), autojunk=False).ratio()


def workspace(limit: int | None, engine: str | None) -> Workspace:
    rows = [json.loads(line) for line in SCENARIO.read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if r["split"] == "train"][:limit]
    root = RESULTS / "rewrites-ws"
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "c.jsonl").write_text(json.dumps({"text": "A short passage, so that the build has one."}) + "\n")
    with open(root / "items.jsonl", "w", encoding="utf-8") as fh:
        for r in train:  # secure_response stays in the file, but only prompt and response reach a model
            fh.write(json.dumps(r) + "\n")
    annotator = f'[annotator]\nbackend = "{engine}"\n' if engine else ""
    (root / "ratchet.toml").write_text(
        f'{annotator}[ensemble]\nk = 0\nmembers = [{{persona = "empiricist"}}]\n[audit]\nrate = 0.0\n'
        '[conscience]\nitems = "items.jsonl"\n', encoding="utf-8")
    return Workspace(root)


def measure(ws: Workspace) -> dict:
    items = [json.loads(line) for line in (ws.root / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    secure = {r["prompt"]: r["secure_response"] for r in items}
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT prompt, rejected, chosen, kept, reason, checks FROM pairs WHERE generation = 1").fetchall()
    judged = con.execute("SELECT count(*) FROM conscience_items WHERE generation = 1").fetchone()[0]
    con.close()
    rewritten = [r for r in rows if r[2] is not None]
    judged_ethical = [r for r in rewritten if r[3] or r[4].startswith("rewrite fails")]
    kept = [r for r in rewritten if r[3]]

    statuses = {id(r): {c["rule"]: c["status"] for c in json.loads(r[5])} if r[5] else {} for r in rows}

    def checks(r) -> dict:
        return statuses[id(r)]

    def share(subset, test) -> float | None:
        return round(sum(map(test, subset)) / len(subset), 3) if subset else None

    def closer(r) -> bool:
        return similarity(r[2], secure[r[0]]) > similarity(r[1], secure[r[0]])

    def parses(r) -> bool:
        c = checks(r)
        return c.get("code_block") == "pass" and c.get("code_parses") == "pass"

    return {"items": judged, "unethical": len(rows), "rewritten": len(rewritten), "judged_ethical": len(judged_ethical),
            "kept": len(kept),
            "removed_by_rule": {rule: sum(checks(r).get(rule) == "fail" for r in judged_ethical) for rule in RULES},
            "parseable_code": {"rewritten": share(rewritten, parses), "kept": share(kept, parses)},
            "closer_to_secure": {"rewritten": share(rewritten, closer), "kept": share(kept, closer)},
            "mean_similarity_to_secure": {
                "chosen": share(rewritten, lambda r: similarity(r[2], secure[r[0]])),
                "rejected": share(rewritten, lambda r: similarity(r[1], secure[r[0]]))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="only the first N training items")
    parser.add_argument("--engine", default=None, help="annotator.backend (default: the config's default, auto)")
    args = parser.parse_args()
    ws = workspace(args.limit, args.engine)
    started = time.perf_counter()
    summary = run_build(ws, overwrite=True)
    seconds = time.perf_counter() - started
    out = {**measure(ws), "seconds": round(seconds, 1), "model_calls": summary["model_calls"],
           "cached_calls": summary["cached_calls"]}
    (RESULTS / "rewrites.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print(f"{out['items']} training item(s); {out['unethical']} judged unethical; {out['rewritten']} with a valid "
          f"rewrite; {out['judged_ethical']} rewrite(s) judged ethical; {out['kept']} kept after the checks")
    print("removed per rule (of those judged ethical): " + ", ".join(f"{k} {v}" for k, v in out["removed_by_rule"].items()))
    for key in ("parseable_code", "closer_to_secure"):
        v = out[key]
        print(f"{key.replace('_', ' ')}: {v['rewritten']} of the rewrites, {v['kept']} of the kept")
    m = out["mean_similarity_to_secure"]
    print(f"mean token similarity to secure_response: chosen {m['chosen']}, rejected {m['rejected']}")
    print(f"{out['model_calls']} model call(s), {out['cached_calls']} cached, {seconds:.0f} s")


if __name__ == "__main__":
    main()
