"""The grounding verifier: a member of the ensemble that is not a language model.

Each claim of an annotation carries `evidence`, a quote of the passage's own words (since
the faithfulness gates, one of the passage's spans by construction: builder/faithfulness.py).
The verifier checks that the quote is one contiguous run of the passage's words, after undoing
the prompt's data marks and normalising case, whitespace, punctuation and quote marks. Nothing
else passes: no ellipsis, no pieces stitched from two sentences, no near-quote (a quote that
passed on its share of word pairs let "four months" stand for "fourteen months").

Per claim, its grounding g is 1 when the quote is a span of the passage, else 0; a claim is
`sound` or `wrong`.

It votes in convergence like a critic, always and on every annotation (it costs no model
call, so it is not one of the k critics), and it can sit on the ratchet's reference panel.
Its verdict is a distribution like every judgement's: P(survives) = the mean grounding of the
claims, P(reject) = the rest, so its score (P(survives) + 0.5 P(revise)) is that mean.
Nothing it decides can be talked round: it reads no instruction.
"""
from __future__ import annotations

from dataclasses import dataclass

from .faithfulness import span_of

KIND = "verifier"
VERSION = "grounding-3"  # the check's identity on a frozen panel: change it when the check changes


def grounding(evidence: str, passage: str) -> float:
    """1.0 for a quote that is one contiguous span of the passage, else 0.0."""
    return float(span_of(evidence, passage))


@dataclass
class Check:
    """The verifier's critique of one annotation."""
    claim_verdicts: list[str]  # sound | wrong, one per claim
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
        else:
            verdicts.append("wrong")
            objections.append(f"claim {i}: its evidence is not in the passage: {evidence[:60]!r}" if evidence
                              else f"claim {i} quotes no evidence")
    share = sum(scores) / len(scores) if scores else 0.0
    verdict = "survives" if share == 1.0 else "reject" if share < 0.5 else "revise"
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
