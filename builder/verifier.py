"""The grounding verifier: a member of the ensemble that is not a language model.

Each claim of an annotation carries `evidence`, a quote of the passage's own words. The
verifier checks that the quote is really in the passage, after undoing the prompt's data
marks and normalising case, whitespace and punctuation (small models copy "40 percent, but"
as "40 percent but"); a quote with "..." is checked part by part, in order.

Per claim, its grounding g is 1 when the quote is in the passage; otherwise the share of the
quote's word pairs (bigrams) that are in the passage, so a quote that drops one "the" scores
high and a made-up one near 0; and 0 whenever the quote holds a number the passage does not
(a small model turns "fourteen months" into "four months": the one change that matters). A
claim is `sound` when its quote is in the passage, `doubtful` when g >= 0.6, `wrong` below
that (or without evidence).

It votes in convergence like a critic, always and on every annotation (it costs no model
call, so it is not one of the k critics), and it can sit on the ratchet's reference panel.
Its verdict is a distribution like every judgement's: P(survives) = the mean grounding of the
claims, P(reject) = the rest, so its score (P(survives) + 0.5 P(revise)) is that mean.
Nothing it decides can be talked round: it reads no instruction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .prompts import unmark

KIND = "verifier"
VERSION = "grounding-2"  # the check's identity on a frozen panel: change it when the check changes
DOUBTFUL = 0.6
NUMBER_WORDS = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
                "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred", "thousand", "million",
                "billion", "half", "quarter", "third", "percent"}
_NOT_WORD = re.compile(r"[^0-9a-z]+")
_ELLIPSIS = re.compile(r"\.\.\.|…")


def normalise(text: str) -> str:
    return _NOT_WORD.sub(" ", unmark(text).lower()).strip()


def _numbers(words: list[str]) -> set[str]:
    return {w for w in words if any(ch.isdigit() for ch in w) or w in NUMBER_WORDS}


def grounding(evidence: str, passage: str) -> float:
    """1.0 for a quote that is in the passage, else the share of its word pairs that are, 0 for
    a quote with a number the passage lacks (see the module docstring)."""
    if grounded(evidence, passage):
        return 1.0
    quote, words = normalise(_ELLIPSIS.sub(" ", evidence)).split(), normalise(passage).split()
    if not quote or _numbers(quote) - set(words):
        return 0.0
    if len(quote) == 1:
        return float(quote[0] in words)
    pairs, have = list(zip(quote, quote[1:])), set(zip(words, words[1:]))
    return round(sum(p in have for p in pairs) / len(pairs), 4)


def grounded(evidence: str, passage: str) -> bool:
    """Every part of the quote is in the passage, in order (parts split at an ellipsis)."""
    haystack = normalise(passage)
    position = 0
    parts = [normalise(p) for p in _ELLIPSIS.split(evidence)]
    parts = [p for p in parts if p]
    if not parts:
        return False
    for part in parts:
        found = haystack.find(part, position)
        if found < 0:
            return False
        position = found + len(part)
    return True


@dataclass
class Check:
    """The verifier's critique of one annotation."""
    claim_verdicts: list[str]  # sound | doubtful | wrong, one per claim
    objections: list[str]
    verdict: str  # survives | revise | reject
    share: float  # the claims' mean grounding

    @property
    def probs(self) -> dict[str, float]:
        return {"survives": self.share, "revise": 0.0, "reject": 1.0 - self.share}


def check(passage: str, record: dict) -> Check:
    verdicts, objections, scores = [], [], []
    for i, claim in enumerate(record.get("claims", []), 1):
        evidence = (claim.get("evidence") or "").strip()
        g = grounding(evidence, passage) if evidence else 0.0
        scores.append(g)
        if g == 1.0:
            verdicts.append("sound")
        elif g >= DOUBTFUL:
            verdicts.append("doubtful")
            objections.append(f"claim {i}: its evidence is not the passage's own words: {evidence[:60]!r}")
        else:
            verdicts.append("wrong")
            objections.append(f"claim {i}: its evidence is not in the passage: {evidence[:60]!r}" if evidence
                              else f"claim {i} quotes no evidence")
    share = sum(scores) / len(scores) if scores else 0.0
    verdict = "survives" if share == 1.0 else "reject" if share < DOUBTFUL else "revise"
    return Check(verdicts, objections[:2], verdict, round(share, 6))


class GroundingVerifier:
    """The ensemble member (`kind = "verifier"`): a name, the critique role, no model."""

    family = KIND
    persona = "grounding"
    roles = ["critique"]
    temperature = None

    def __init__(self, name: str = "grounding"):
        self.name = name

    def describe(self) -> dict:
        return {"kind": KIND, "roles": self.roles, "family": self.family, "version": VERSION,
                "checks": "each claim's evidence quote is in the passage"}
