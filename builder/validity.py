"""Meta-evaluation by perturbation: can a judge tell a reflection from a known-worse variant?

No human labels are needed. For every accepted reflection of a built generation, known-worse
variants are made (DESIGN.md, idea 7):

  other     the reflection of another passage
  evidence  every claim's evidence quote replaced by words that are not in the passage
  support   support levels flipped (strong <-> none, moderate <-> weak)
  negated   the first claim negated ("It is not the case that ...")
  cut       the reflection cut after its first claim

A judge's score of a reflection is P(survives) + 0.5 P(revise) (raw and calibrated); its AUC
on a perturbation is the probability that it scores the original above the variant (ties
count half): 0.5 is noise, 1.0 a perfect judge. The pairwise test asks the judge which of
the two is better, in both orders: the win rate of the original and how often both orders
agree (position consistency).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

PERTURBATIONS = ("other", "evidence", "support", "negated", "cut")
FLIP = {"strong": "none", "none": "strong", "moderate": "weak", "weak": "moderate"}
# Words that are in no passage of the sample corpus: a quote of them is not the passage's own.
FOREIGN = ["the minister resigned after the vote on Friday", "sales of umbrellas doubled in the northern towns",
           "the orchestra cancelled its winter season", "a new vaccine was approved for children"]


@dataclass
class Variant:
    passage_id: str
    passage: str
    kind: str  # original | one of PERTURBATIONS
    record: dict


def perturb(passage_id: str, passage: str, record: dict, other: dict, i: int = 0) -> list[Variant]:
    """The known-worse variants of one reflection (`other`: another passage's reflection)."""
    out = []
    out.append(Variant(passage_id, passage, "other", copy.deepcopy(other)))
    ev = copy.deepcopy(record)
    for j, c in enumerate(ev["claims"]):
        c["evidence"] = FOREIGN[(i + j) % len(FOREIGN)]
    out.append(Variant(passage_id, passage, "evidence", ev))
    flipped = copy.deepcopy(record)
    for c in flipped["claims"]:
        c["support"] = FLIP.get(c["support"], c["support"])
    out.append(Variant(passage_id, passage, "support", flipped))
    negated = copy.deepcopy(record)
    first = negated["claims"][0]["claim"]
    negated["claims"][0]["claim"] = f"It is not the case that {first[:1].lower()}{first[1:]}"
    out.append(Variant(passage_id, passage, "negated", negated))
    cut = copy.deepcopy(record)
    cut.update(claims=cut["claims"][:1], weak_reasoning=[], uncertainties=[], ethical_stakes=[],
               reflection=" ".join(cut["reflection"].split()[:4]) + " ...")
    out.append(Variant(passage_id, passage, "cut", cut))
    return out


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counting half (the ROC AUC)."""
    if not positives or not negatives:
        return None
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(positives) + [0] * len(negatives)
    scores = list(positives) + list(negatives)
    if len(set(scores)) == 1:
        return 0.5  # every score equal: no information at all
    return round(float(roc_auc_score(labels, scores)), 4)
