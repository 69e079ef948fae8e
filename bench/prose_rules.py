"""How the prose rules of the faithfulness gate (faithfulness.unborne) fall on reflections a person
has read: every note and reflection sentence of the kept reflections in the audit files, whether
a rule cuts it, and whether the reader passed the reflection's prose.

    python bench/prose_rules.py [AUDIT.jsonl ...]

The files are those of docs/faithfulness.md (the page audit's and the helper's readings of
2026-12-06); their notes and prose are the writers' as kept then, before these rules. A rule that
cuts sentences of reflections the reader passed costs faithful text; one that cuts only in failed
reflections removes what the reader failed, or at least text that was around it.
"""
from __future__ import annotations

import ast
import json
import sys
from collections import Counter
from pathlib import Path

from builder import faithfulness as f

RESULTS = Path(__file__).parent / "results"
DEFAULT = [RESULTS / "faithfulness-audit-demo-page-2026-12-06.jsonl", RESULTS / "faithfulness-audit-demo-2026-12-06.jsonl",
           RESULTS / "faithfulness-audit-demo-page-2026-12-06b.jsonl"]


def readings(path: Path):
    """(passage, annotation, prose passed?) per audited reflection of one file."""
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "annotation" in row:  # bench/page_audit.py's export: one verdict for claims and prose
            yield row["passage"], row["annotation"], row["verdict"] == "pass"
        else:  # a reader's sheet: the prose judged on its own
            record = row["reflection"]
            yield row["passage"], ast.literal_eval(record) if isinstance(record, str) else record, \
                row["prose_faithful"] == "True"


def main(paths: list[Path]) -> None:
    cut, kept, cleared = Counter(), Counter(), Counter()
    for path in paths:
        for passage, record, passed in readings(path):
            texts = [(n, True) for key in f.NOTE_FIELDS for n in record.get(key) or []]
            faults = []
            for text, note in texts + [(record.get("reflection") or "", False)]:
                for sentence in filter(str.strip, f._SENTENCE.split(text.strip())):
                    why = f.unborne(sentence, passage, note=note)
                    rule = (why if why.startswith("cut off") else why.split(":")[0]) if why else None
                    (cut if why else kept)[(rule, passed)] += 1
                    faults.append(why)
            cleared[passed, any(faults)] += 1
    print("sentences cut, by rule: in reflections the reader passed / failed")
    for rule in sorted({r for r, _ in cut}):
        print(f"  {rule:<45} {cut[rule, True]:>3} / {cut[rule, False]:>3}")
    print(f"sentences kept: {sum(v for (r, p), v in kept.items() if p)} / {sum(v for (r, p), v in kept.items() if not p)}")
    print(f"reflections with a sentence cut: passed {cleared[True, True]} of {cleared[True, True] + cleared[True, False]}, "
          f"failed {cleared[False, True]} of {cleared[False, True] + cleared[False, False]}")


if __name__ == "__main__":
    main([Path(p) for p in sys.argv[1:]] or DEFAULT)
