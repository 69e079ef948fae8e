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
import hashlib
import json
import re
from dataclasses import dataclass

from .faithfulness import NUMBER_WORDS, STOPWORDS

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


# ---------------------------------------------------------------- claim-level variants
# For a claim judge (builder/judges.py): each turns a claim its passage supports into one it does
# not, the way a small writer gets things wrong. None where the claim has nothing to change.

_AUXILIARY = re.compile(r"\b(is|are|was|were|has|have|had|will|would|can|could|should|must|does|did|do|may|might)\b",
                        re.IGNORECASE)
_NUMBER = re.compile(r"\b\d[\d,.]*\b|\b(?:" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")\b",
                     re.IGNORECASE)
CALENDAR = set("""january february march april may june july august september october november december monday
tuesday wednesday thursday friday saturday sunday""".split())  # capitalised, but no name to swap
_CAPITALISED = re.compile(r"(?<!^)(?<![.!?]\s)\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)*")


def negate_claim(claim: str) -> str:
    """The claim with its first auxiliary verb negated ("was" -> "was not"), or, without one,
    prefixed by "It is not true that"."""
    negative = re.search(r"\b(" + _AUXILIARY.pattern[3:-3] + r")\s+not\b", claim, re.IGNORECASE)
    if negative:  # already negative: affirm it ("did not say" -> "did say")
        return claim[:negative.start()] + negative.group(1) + claim[negative.end():]
    if _AUXILIARY.search(claim):
        return _AUXILIARY.sub(lambda m: f"{m.group(0)} not", claim, count=1)
    return f"It is not true that {claim[:1].lower()}{claim[1:]}"


def change_number(claim: str) -> str | None:
    """The claim with its first number changed: digits scaled by 1.5 (at least +1), a spelled
    number to another one."""
    found = _NUMBER.search(claim)
    if not found:
        return None
    text = found.group(0)
    digits = text.replace(",", "")
    try:
        value = float(digits)
        new = value * 1.5 if value >= 2 else value + 1
        changed = f"{new:g}" if "." in digits else f"{round(new):,}" if "," in text else str(round(new))
    except ValueError:
        word = text.lower()
        if word not in NUMBER_WORDS:
            return None
        words = sorted(NUMBER_WORDS - {"percent", "dozen", "twice", "double", "triple", "quarter", "hundred", "thousand",
                                       "million", "billion", word})
        changed = words[(sorted(NUMBER_WORDS).index(word) + 3) % len(words)]
    return claim[:found.start()] + changed + claim[found.end():]


def swap_entity(claim: str, names: list[str]) -> str | None:
    """The claim with its first capitalised name (not the first word) replaced by another name
    from `names` (names of other passages); None without a name in the claim."""
    found = next((m for m in _CAPITALISED.finditer(claim) if m.group(0).lower() not in STOPWORDS | CALENDAR), None)
    if not found:
        return None
    others = [n for n in names if n.lower() != found.group(0).lower()]
    if not others:
        return None
    other = others[sum(map(ord, found.group(0))) % len(others)]  # deterministic, spread over the pool
    return claim[:found.start()] + other + claim[found.end():]


def names_of(text: str) -> list[str]:
    """Capitalised names in a text (not a sentence's first word)."""
    return [m.group(0) for m in _CAPITALISED.finditer(text) if m.group(0).lower() not in STOPWORDS | CALENDAR]



# ---------------------------------------------------------------- a critic's measured validity
# A critic's vote weighs what it has shown on labelled data (`ratchet validity`): each labelled
# claim (a person's `supported` / `unsupported` against its passage) becomes a reflection of that
# one claim, the critic scores it, and its AUC (unsupported scored lower) becomes its weight.


def one_claim_record(claim: str, evidence: str) -> dict:
    """A reflection of a single claim: what a critic scores for one labelled claim."""
    return {"claims": [{"evidence": evidence, "claim": claim, "kind": "fact", "support": "moderate", "confidence": "medium"}],
            "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [], "reflection": claim}


def vote_weight(auc_low: float | None) -> float:
    """2 x (the lower end of the AUC's 95% interval) - 1, floored at 0: a judge weighs only the
    discrimination it has shown beyond chance (Somers' D of its worst plausible AUC). At or below
    chance: 0, and it is not asked."""
    return 0.0 if auc_low is None else round(max(0.0, 2 * auc_low - 1), 4)


def critic_key(model_hash: str, questions: dict) -> str:
    """What a measurement holds for: the model's weights and what it is asked with (the critique
    prompts, its persona, the schema). Another file or an edited prompt is unmeasured."""
    blob = json.dumps({"model": model_hash, "questions": questions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
