"""Converge: a score per annotation from its critics' verdicts, one kept annotation per passage
(or none, with the reason), and how far the critics agree (Krippendorff's alpha).

score = weighted share of critics whose verdict is `survives`; a critic's weight is its
reputation (audit pass rate, Beta posterior mean) earned in earlier generations, the prior
0.5 for a member never audited, so in generation 1 every vote weighs the same. Earlier
generations only: this generation's audit sample is secret, and nothing published may
depend on which items it holds.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import krippendorff
import numpy as np

from .scrutinize import CritiqueResult

VERDICTS = ("survives", "revise", "reject")
PRIOR_WEIGHT = 0.5  # mean of Beta(1, 1): no audit evidence either way


@dataclass
class Scored:
    passage_id: str
    annotator: str
    score: float | None  # None: not scrutinized, or no valid critique
    critiques: int  # valid critiques behind the score


@dataclass
class Selection:
    passage_id: str
    annotator: str | None  # None: the passage keeps no annotation this generation
    score: float | None
    reason: str


def convergence_score(votes: list[tuple[str, str]], weights: dict[str, float]) -> float | None:
    """votes: (critic, verdict) of the valid critiques of one annotation."""
    total = sum(weights.get(critic, PRIOR_WEIGHT) for critic, _ in votes)
    if not votes or total <= 0:
        return None
    return sum(weights.get(critic, PRIOR_WEIGHT) for critic, verdict in votes if verdict == "survives") / total


def score_annotations(accepted: list[tuple[str, str]], critiques: list[CritiqueResult],
                      weights: dict[str, float]) -> list[Scored]:
    """accepted: (passage_id, annotator) of every valid annotation."""
    votes: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for c in critiques:
        if c.status == "accepted":
            votes[(c.passage_id, c.author)].append((c.critic, c.verdict))
    return [Scored(pid, author, convergence_score(votes[(pid, author)], weights), len(votes[(pid, author)]))
            for pid, author in accepted]


def select(passage_ids: list[str], scored: list[Scored], threshold: float, scrutinized: bool,
           member_order: list[str]) -> list[Selection]:
    """Per passage, the annotation with the highest score at or above the threshold (ties: more
    critiques, then the ensemble's order), or none with the reason."""
    by_passage: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_passage[s.passage_id].append(s)
    rank = {name: i for i, name in enumerate(member_order)}
    out = []
    for pid in passage_ids:
        candidates = by_passage.get(pid, [])
        if not candidates:
            out.append(Selection(pid, None, None, "no valid annotation"))
            continue
        if not scrutinized:
            first = min(candidates, key=lambda s: rank.get(s.annotator, len(rank)))
            out.append(Selection(pid, first.annotator, None, "not scrutinized (ensemble.k = 0)"))
            continue
        rated = [s for s in candidates if s.score is not None]
        if not rated:
            out.append(Selection(pid, None, None, "no valid critique"))
            continue
        best = min(rated, key=lambda s: (-s.score, -s.critiques, rank.get(s.annotator, len(rank))))
        if best.score >= threshold:
            out.append(Selection(pid, best.annotator, best.score, "converged"))
        else:
            out.append(Selection(pid, None, best.score,
                                 f"below threshold: best score {best.score:.2f} ({best.annotator}) < {threshold:.2f}"))
    return out


def alpha(critiques: list[CritiqueResult]) -> float | None:
    """Krippendorff's alpha (nominal) of the critics' verdicts: units are annotations, coders
    are critics. None where it is undefined (no annotation with two verdicts, or no variation)."""
    valid = [c for c in critiques if c.status == "accepted"]
    units = sorted({(c.passage_id, c.author) for c in valid})
    coders = sorted({c.critic for c in valid})
    if len(coders) < 2 or not units:
        return None
    col, row = {u: j for j, u in enumerate(units)}, {c: i for i, c in enumerate(coders)}
    data = np.full((len(coders), len(units)), np.nan)
    for c in valid:
        data[row[c.critic], col[(c.passage_id, c.author)]] = VERDICTS.index(c.verdict)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 where nobody disagrees: undefined
            value = krippendorff.alpha(reliability_data=data, level_of_measurement="nominal", value_domain=[0, 1, 2])
    except ValueError:
        return None
    return None if math.isnan(value) else round(float(value), 4)


@dataclass
class Agreement:
    scope: str  # generation | author (annotations by this member) | critic (annotations this member critiqued)
    member: str  # "*" for the generation
    alpha: float | None
    units: int  # annotations with at least two valid verdicts
    critiques: int


def _agreement(scope: str, member: str, critiques: list[CritiqueResult]) -> Agreement:
    valid = [c for c in critiques if c.status == "accepted"]
    per_unit: dict[tuple, int] = defaultdict(int)
    for c in valid:
        per_unit[(c.passage_id, c.author)] += 1
    return Agreement(scope, member, alpha(valid), sum(n >= 2 for n in per_unit.values()), len(valid))


def agreement(critiques: list[CritiqueResult]) -> list[Agreement]:
    """Alpha for the whole generation, per author (do critics agree about this member's work?)
    and per critic (over the annotations it critiqued, with the other critics of those)."""
    rows = [_agreement("generation", "*", critiques)]
    for author in sorted({c.author for c in critiques}):
        rows.append(_agreement("author", author, [c for c in critiques if c.author == author]))
    for critic in sorted({c.critic for c in critiques}):
        units = {(c.passage_id, c.author) for c in critiques if c.critic == critic}
        rows.append(_agreement("critic", critic, [c for c in critiques if (c.passage_id, c.author) in units]))
    return rows
