"""Tables declared by row dataclasses: a workspace an older builder made gets today's key."""
import dataclasses

import duckdb
import pytest

from builder.stages.audit import AUDITS, AuditRow, store_audits
from builder.tables import Table, primary_keys

# The audits table as builders before issue 31.2 made it: keyed without the auditor's kind.
OLD_AUDITS = """CREATE TABLE audits(item VARCHAR, annotator VARCHAR, generation INTEGER, auditor VARCHAR,
    auditor_kind VARCHAR NOT NULL, verdict VARCHAR NOT NULL, reasons JSON, wrong_claims JSON,
    audited_at TIMESTAMP DEFAULT(current_timestamp), PRIMARY KEY(item, annotator, generation, auditor))"""


def audit(auditor: str, kind: str, verdict: str) -> AuditRow:
    return AuditRow("p1", "writer", 1, auditor, kind, verdict, None, None)


def test_an_older_audits_table_is_rekeyed_with_the_auditor_kind_and_keeps_its_rows():
    """Issue 31.2: a person's verdict and the model auditor's are two rows even under one name.
    An older workspace's table (keyed by the name alone) is rebuilt under the new key with every
    row, its time of audit included, and the views over it read it afterwards."""
    con = duckdb.connect()
    con.execute(OLD_AUDITS)
    con.execute("INSERT INTO audits VALUES ('p1', 'writer', 1, 'smollm2-auditor', 'model', 'pass', NULL, NULL, "
                "TIMESTAMP '2026-01-02 03:04:05'), ('p2', 'writer', 1, 'ana', 'human', 'fail', '[\"x\"]', '[1]', "
                "TIMESTAMP '2026-01-03 00:00:00')")
    con.execute("CREATE VIEW audit_names AS SELECT auditor FROM audits")
    before = con.execute("SELECT item, auditor, auditor_kind, verdict, reasons, wrong_claims, audited_at "
                         "FROM audits ORDER BY item").fetchall()

    AUDITS.create(con)

    assert primary_keys(con)["audits"] == ("item", "annotator", "generation", "auditor", "auditor_kind")
    assert con.execute("SELECT item, auditor, auditor_kind, verdict, reasons, wrong_claims, audited_at "
                       "FROM audits ORDER BY item").fetchall() == before
    assert con.execute("SELECT count(*) FROM audit_names").fetchone()[0] == 2
    con.execute("CREATE TABLE audit_items (item VARCHAR, annotator VARCHAR, generation INTEGER, by_model BOOLEAN, "
                "by_human BOOLEAN, PRIMARY KEY (item, annotator, generation))")
    store_audits(con, 1, [audit("smollm2-auditor", "human", "fail")])  # a person's verdict under the model's name
    rows = con.execute("SELECT auditor_kind, verdict FROM audits WHERE item = 'p1' ORDER BY ALL").fetchall()
    assert rows == [("human", "fail"), ("model", "pass")]  # the model's verdict is still there
    AUDITS.create(con)  # a second connect finds the key as declared and changes nothing
    assert con.execute("SELECT count(*) FROM audits").fetchone()[0] == 3


def test_a_key_that_would_drop_a_column_is_an_error_that_names_both_keys():
    """Rows unique under the old key might not be under a narrower one: refused, nothing lost."""
    @dataclasses.dataclass
    class Row:
        a: str
        b: str

    con = duckdb.connect()
    con.execute("CREATE TABLE t (a VARCHAR, b VARCHAR, PRIMARY KEY (a, b))")
    con.execute("INSERT INTO t VALUES ('x', '1'), ('x', '2')")
    with pytest.raises(TypeError, match=r"keys it by a, b, this builder by a"):
        Table("t", Row, key=("a",), register=False).create(con)
    assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 2
