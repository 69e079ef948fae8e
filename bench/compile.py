"""Compile cost scales with data, not with models: compile one generation of N synthetic
passages (default 1 million) with their annotations, critiques and ratchet decisions, filled
straight into the workspace's DuckDB tables (no model call), and print wall time and peak
memory of the compile alone (a fresh process, so the fill does not count).

    .venv/bin/python bench/compile.py                 # 1,000,000 passages
    .venv/bin/python bench/compile.py --passages 100000

Targets on a 2-core machine: < 30 s and < 1.5 GB peak RSS for 1 M passages.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PASSAGES_PER_DOCUMENT = 4

FILL_SQL = """
INSERT INTO passages (passage_id, source, position, text, n_tokens)
SELECT printf('%016x', i), 'synthetic.jsonl:' || (i // $per + 1), i % $per,
       'Report ' || i || ': the council of district ' || (i % 977) || ' says the new bridge cut commuting times by '
       || (i % 60) || ' percent, but it has published no data. Residents quoted in the article disagree, and the '
       || 'opposition calls the figure ' || md5(i::VARCHAR) || '.', 60
FROM range($n) t(i);
INSERT INTO generation_passages SELECT 1, i, printf('%016x', i), 'synthetic.jsonl:' || (i // $per + 1), i % $per
FROM range($n) t(i);
INSERT INTO annotations (generation, passage_id, annotator, status, reason, attempts, truncated, record, call_key)
SELECT 1, printf('%016x', i), 'smollm2-empiricist', 'accepted', NULL, 1, 0,
       json_object('claims', [json_object('claim', 'The bridge cut commuting times by ' || (i % 60) || ' percent',
                                          'kind', 'fact', 'support', 'weak', 'confidence', 'medium'),
                              json_object('claim', 'The council published no data', 'kind', 'fact',
                                          'support', 'strong', 'confidence', 'high')],
                   'weak_reasoning', ['An unsourced statistic'], 'uncertainties', ['Whether the figure is measured'],
                   'ethical_stakes', ['Residents may be misled'],
                   'reflection', 'A claim without evidence; treat the ' || (i % 60) || ' percent figure as unverified.'),
       md5(i::VARCHAR)
FROM range($n) t(i);
INSERT INTO critiques (generation, passage_id, annotator, critic, status, verdict, claim_verdicts, objections,
                       weight, reason, attempts, call_key)
SELECT 1, printf('%016x', i), 'smollm2-empiricist', critic, 'accepted',
       CASE WHEN (i + c) % 3 = 0 THEN 'reject' ELSE 'survives' END, '["sound", "doubtful"]',
       '["The figure is not sourced"]', 0.5, NULL, 1, md5(i::VARCHAR || critic)
FROM range($n) t(i), (VALUES (0, 'gemma3-skeptic'), (1, 'smollm2-care-ethicist')) c(c, critic);
INSERT INTO convergence (generation, passage_id, annotator, score, critiques, selected) SELECT 1, printf('%016x', i), 'smollm2-empiricist',
       CASE WHEN i % 3 = 0 THEN 0.5 ELSE 1.0 END, 2, true FROM range($n) t(i);
INSERT INTO selections (generation, passage_id, annotator, score, reason) SELECT 1, printf('%016x', i), 'smollm2-empiricist',
       CASE WHEN i % 3 = 0 THEN 0.5 ELSE 1.0 END, 'selected' FROM range($n) t(i);
INSERT INTO ratchet (generation, passage_id, decision, annotator, source_generation, record, reflection, score,
                    parent_annotator, parent_generation, parent_score, new_annotator, new_score, reflection_key, reason)
SELECT 1, a.passage_id, 'new', a.annotator, 1, a.record,
       'Claims:' || chr(10) || '- ' || (a.record->>'$.claims[0].claim') || ' (fact; support: weak)' || chr(10)
       || 'Reflection: ' || (a.record->>'$.reflection'),
       0.75, NULL, NULL, NULL, a.annotator, 0.75, md5(a.passage_id), 'first reflection of this passage'
FROM annotations a;
INSERT INTO members (name, family, persona, model, backend) VALUES ('smollm2-empiricist', 'llama', 'empiricist', 'SmolLM2-135M-Instruct.Q4_1.gguf', 'llama_cpp');
INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict, reasons, wrong_claims, audited_at)
SELECT printf('%016x', i), 'smollm2-empiricist', 1, 'smollm2-auditor', 'model',
       CASE WHEN i % 5 = 0 THEN 'fail' ELSE 'pass' END, '[]', '[]', TIMESTAMP '2026-01-01'
FROM range(0, $n, 4) t(i);
INSERT INTO reputation (annotator, generation, passes, fails, alpha, beta, mean) VALUES ('smollm2-empiricist', 1, 0, 0, 1, 1, 0.8);
"""


def fill(ws_root: Path, n: int) -> float:
    from builder.workspace import Workspace

    (ws_root / "ratchet.toml").write_text("[audit]\nrate = 0.25\n", encoding="utf-8")
    con = Workspace(ws_root).connect()
    started = time.perf_counter()
    for statement in filter(str.strip, FILL_SQL.split(";\n")):
        con.execute(statement, {k: v for k, v in {"n": n, "per": PASSAGES_PER_DOCUMENT}.items() if f"${k}" in statement})
    con.close()
    return time.perf_counter() - started


def metrics(n: int) -> dict:
    """What a real build hands the compiler besides the tables (the card reads these)."""
    member = {"family": "llama", "persona": "empiricist", "roles": ["annotate", "critique"], "accepted": n,
              "rejected": 0, "selected": n, "mean_score": 0.83, "critiques": 0, "survives_given": 0}
    history = [{"generation": 1, "passages": n, "with_reflection": n, "mean_score": 0.75, "with_parent": 0,
                "replaced": 0, "carried": 0, "unchanged": 0, "new": n, "replacement_rate": None, "carried_rate": None}]
    return {"truncation_rate": 0.0, "seconds": 0.0,
            "ensemble": {"k": 2, "threshold": 0.5, "families": ["llama"], "members": {"smollm2-empiricist": member},
                         "critiques": 2 * n, "invalid_critiques": 0, "verdicts": {}, "selected": n, "not_selected": {},
                         "agreement": {"generation": None}, "warnings": []},
            "audit": {"rate": 0.25, "sampled": n // 4, "audits": n // 4, "pass_rate": 0.8, "invalid_verdicts": 0,
                      "reputation": {"smollm2-empiricist": 0.8}},
            "conscience": None, "consent": None,
            "ratchet": {**history[0], "history": history, "panel": ["smollm2-empiricist"]}}


MODELS = {"smollm2-empiricist": {"persona": "empiricist", "roles": ["annotate", "critique"], "family": "llama",
                                 "model": "SmolLM2-135M-Instruct.Q4_1.gguf", "backend": "llama_cpp"}}


def compile_only(ws_root: Path, n: int) -> None:
    from builder.compile import compile_generation
    from builder.prompts import Prompts
    from builder.workspace import Workspace

    ws = Workspace(ws_root)
    con = ws.connect()
    started = time.perf_counter()
    out, _ = compile_generation(ws, con, 1, Prompts(), MODELS, metrics(n))
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manifest = json.loads((out / "manifest.json").read_text())
    size = sum(p.stat().st_size for p in (out / "data").iterdir()) / 1e6
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak_mb), "splits_mb": round(size, 1),
                      "counts": manifest["counts"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=1_000_000)
    parser.add_argument("--compile-only", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.compile_only, args.passages)
    with tempfile.TemporaryDirectory(prefix="ratchet-bench-compile-") as tmp:
        root = Path(tmp)
        fill_s = fill(root, args.passages)
        print(f"filled {args.passages:,} passages (+ annotations, 2 critiques each, ratchet rows, audits) in {fill_s:.1f} s")
        proc = subprocess.run([sys.executable, __file__, "--compile-only", str(root), "--passages", str(args.passages)],
                              capture_output=True, text=True, check=False)
        if proc.returncode:
            sys.exit(proc.stderr)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        c = r["counts"]
        print(f"compile: {r['seconds']} s wall, peak RSS {r['peak_rss_mb']} MB (targets: < 30 s, < 1536 MB)")
        print(f"  wrote {r['splits_mb']} MB of parquet: sft {c['sft_examples']:,} documents / {c['reflections']:,} "
              f"reflections, annotations {c['annotations_accepted']:,}, audit_summary {c['audit_summary_rows']} row(s)")
        ok = r["seconds"] < 30 and r["peak_rss_mb"] < 1536
        print("within targets" if ok else "OVER TARGET")


if __name__ == "__main__":
    main()
