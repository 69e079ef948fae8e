"""Every documented audit view on 10 million synthetic audit rows: each must answer in
under 1 s on a 2-core machine. No model calls: the tables are filled with SQL.

Shape: 5 M annotated items by 8 annotators over 5 generations; each item audited by the
model auditor, 80% of them by a second model auditor and 20% by a person (10 M audits).

Usage: python bench/audit_sql.py [--rows N]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from builder.stages.audit import update_reputation  # noqa: E402
from builder.workspace import create_schema  # noqa: E402

VIEWS = ["audit_pass_rate_by_annotator", "audit_pass_rate_by_persona", "audit_pass_rate_by_family",
         "audit_pass_rate_by_generation", "audit_model_vs_human", "audit_coverage", "critique_audit_rate_by_critic"]
TARGET_S = 0.5


def fill(con, rows: int) -> None:
    items = rows // 2
    con.execute("""INSERT INTO members (name, family, persona, model, backend) SELECT 'member' || i, CASE WHEN i % 2 = 0 THEN 'llama' ELSE 'gemma3' END,
                   ['empiricist', 'skeptic', 'virtue', 'care'][i % 4 + 1], 'm.gguf', 'llama_cpp' FROM range(8) t(i)""")
    con.execute(f"""INSERT INTO passages (passage_id, source, position, text, n_tokens, added_at) SELECT 'p' || i, 's', 0, 'text', 1, now() FROM range({items}) t(i)""")
    con.execute(f"""INSERT INTO annotations (generation, passage_id, annotator, status, reason, attempts, truncated, record, call_key)
                    SELECT 1 + i % 5, 'p' || i, 'member' || i % 8, 'accepted', NULL, 1, 0, NULL, NULL
                    FROM range({items}) t(i)""")
    con.execute(f"""
        INSERT INTO audits (item, annotator, generation, auditor, auditor_kind, verdict, reasons, wrong_claims)
        SELECT 'p' || (i // 2), 'member' || (i // 2) % 8, 1 + (i // 2) % 5,
               CASE WHEN i % 2 = 0 THEN 'smollm2-auditor' WHEN (i // 2) % 5 = 0 THEN 'ana' ELSE 'gemma3-auditor' END,
               CASE WHEN i % 2 = 1 AND (i // 2) % 5 = 0 THEN 'human' ELSE 'model' END,
               CASE WHEN hash(i) % 4 = 0 THEN 'fail' ELSE 'pass' END, '[]', '[]'
        FROM range({rows}) t(i)""")
    # as many critique audits: every annotation's two critics, audited by a model and sometimes a person
    con.execute(f"""
        INSERT INTO critique_audits (item, annotator, critic, generation, auditor, auditor_kind, verdict, reasons, right_prob)
        SELECT 'p' || (i // 2), 'member' || (i // 2) % 8, 'member' || ((i // 2) + 1 + i % 2) % 8, 1 + (i // 2) % 5,
               CASE WHEN hash(i) % 5 = 0 THEN 'ana' ELSE 'smollm2-auditor' END,
               CASE WHEN hash(i) % 5 = 0 THEN 'human' ELSE 'model' END,
               CASE WHEN hash(i) % 3 = 0 THEN 'wrong' ELSE 'right' END, '[]', 0.7
        FROM range({rows}) t(i)""")
    # what builder.audit.store_audits keeps up to date as audits arrive
    con.execute("""INSERT INTO audit_items (item, annotator, generation, by_model, by_human) SELECT item, annotator, generation, bool_or(auditor_kind = 'model'),
                   bool_or(auditor_kind = 'human') FROM audits GROUP BY ALL""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        con = duckdb.connect(str(Path(tmp) / "bench.duckdb"))
        create_schema(con)
        start = time.perf_counter()
        fill(con, args.rows)
        rows = con.execute("SELECT count(*) FROM audits").fetchone()[0]
        threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
        print(f"filled {rows:,} audit rows in {time.perf_counter() - start:.1f} s (duckdb threads: {threads})")
        worst = 0.0
        for view in VIEWS + ["reputation (update_reputation)"]:
            start = time.perf_counter()
            if view.startswith("reputation"):
                update_reputation(con, 5)
                n = con.execute("SELECT count(*) FROM reputation").fetchone()[0]
            else:
                n = len(con.execute(f"SELECT * FROM {view}").fetchall())
            seconds = time.perf_counter() - start
            worst = max(worst, seconds)
            print(f"{view:32s} {seconds * 1000:8.1f} ms  {n:5d} rows  {'ok' if seconds < TARGET_S else f'SLOW (target < {TARGET_S} s)'}")
        print(f"slowest view: {worst:.3f} s (target < {TARGET_S} s)")


if __name__ == "__main__":
    main()
