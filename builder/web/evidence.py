"""Where each claim's evidence stands in its passage, for the audit page to highlight: checking
quotes by eye was most of an auditor's time (#31.6). Matching forgives what the faithfulness
check forgives (spacing, case, curly or straight quote marks); a quote found nowhere is said so."""
from __future__ import annotations

import re

_QUOTES = "'\"‘’“”"


def _pattern(evidence: str) -> re.Pattern | None:
    tokens = evidence.split()
    if not tokens:
        return None
    quote = f"[{re.escape(_QUOTES)}]"
    parts = ["".join(quote if ch in _QUOTES else re.escape(ch) for ch in t) for t in tokens]
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.IGNORECASE)  # whole words only


def find(evidence: str, passage: str) -> tuple[int, int] | None:
    """The first place the evidence stands in the passage, as (start, end), or None."""
    pattern = _pattern(evidence or "")
    match = pattern.search(passage) if pattern else None
    return match.span() if match else None


def segments(passage: str, claims: list[dict]) -> tuple[list[dict], list[bool]]:
    """The passage cut where evidence starts and ends: [{text, claims (1-based numbers whose
    evidence covers it)}], and for each claim whether its evidence was found."""
    spans = [find(c.get("evidence", ""), passage) for c in claims]
    cuts = sorted({0, len(passage), *(i for span in spans if span for i in span)})
    out = []
    for start, end in zip(cuts, cuts[1:]):
        covering = [n for n, span in enumerate(spans, 1) if span and span[0] <= start and end <= span[1]]
        if out and out[-1]["claims"] == covering:
            out[-1]["text"] += passage[start:end]
        else:
            out.append({"text": passage[start:end], "claims": covering})
    return out, [span is not None for span in spans]
