"""Where the audit page highlights each claim's evidence (no server, no model)."""
from builder.web.evidence import find, segments

PASSAGE = "The bridge reopened on Tuesday. Engineers replaced 212 ‘corroded’ cables, and the deck was resurfaced."


def test_segments_cover_the_passage_and_mark_each_quote_with_its_claims():
    claims = [{"evidence": "engineers replaced 212 'corroded'  cables"},  # case, spacing and quote marks differ
              {"evidence": "The bridge reopened on Tuesday."},
              {"evidence": "a sentence the passage does not hold"},
              {"evidence": "212 ‘corroded’ cables, and the deck was resurfaced."}]  # overlaps the first
    marked, found = segments(PASSAGE, claims)
    assert "".join(s["text"] for s in marked) == PASSAGE  # nothing lost or added
    assert found == [True, True, False, True]
    covered = {s["text"]: s["claims"] for s in marked}
    assert covered["The bridge reopened on Tuesday."] == [2]
    assert covered["Engineers replaced "] == [1] and covered["212 ‘corroded’ cables"] == [1, 4]
    assert covered[", and the deck was resurfaced."] == [4] and covered[" "] == []


def test_no_evidence_marks_nothing():
    assert segments(PASSAGE, [{"claim": "no evidence field"}, {"evidence": ""}]) == (
        [{"text": PASSAGE, "claims": []}], [False, False])
    assert find("Engineers replaced 212", PASSAGE) == (32, 54) and find("Engineers replaced 21", PASSAGE) is None
    assert find("deck was  RESURFACED.", PASSAGE)[1] == len(PASSAGE)
