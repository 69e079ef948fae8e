"""What an audit judged, as a hash the database computes from the stored text (over `p`
passages, `a` annotations, `c` critiques): the passage and the annotation, and for a critique
the critique too. An audit keeps the hash of what its auditor read; once a rebuild changes that
text, the verdict is stale (views audits_current / audits_stale in workspace.py). Computed by
DuckDB, not Python, so that views and the page agree byte for byte on the stored text."""

ANNOTATION_HASH_SQL = "sha256(p.text || chr(31) || a.record::VARCHAR)"
CRITIQUE_HASH_SQL = ("sha256(p.text || chr(31) || a.record::VARCHAR || chr(31) || coalesce(c.claim_verdicts::VARCHAR, '') "
                     "|| chr(31) || coalesce(c.objections::VARCHAR, '') || chr(31) || coalesce(c.verdict, ''))")
