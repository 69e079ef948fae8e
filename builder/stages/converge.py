"""Converge: a score per annotation from its critics' verdicts, one kept annotation per passage
(or none, with the reason), and how far the critics agree (Krippendorff's alpha).

score = weighted mean over critics of P(survives) + 0.5 P(revise) (the critic's verdict as a
distribution, stages/base.py: grade); a critic's weight is its own audited record as a critic
(the Beta posterior mean of its rate of right verdicts in the critique audits, stages/audit.py)
earned in earlier generations, the prior 0.5 for a member never audited, so in generation 1
every vote weighs the same. Earlier
generations only: this generation's audit sample is secret, and nothing published may
depend on which items it holds.
"""
from __future__ import annotations

import hashlib
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass

import krippendorff
import numpy as np

from ..tables import Table, doc
from .base import BuildContext, Stage
from .scrutinize import PRIOR_WEIGHT, VERDICT_POINTS, CritiqueRow, stage_weights

VERDICTS = ("survives", "revise", "reject")


@dataclass
class Scored:
    passage_id: str
    annotator: str
    score: float | None  # None: not scrutinized, or no valid critique
    critiques: int  # valid critiques behind the score
    dropped: int = 0  # claims the faithfulness gates dropped from it (faithfulness.gate)
    verified: int = 0  # claims that passed them
    abstained: int = 0  # critiques whose critic was too unsure to vote (judges.abstain_below): not in the score


@dataclass
class Selection:
    passage_id: str
    annotator: str | None  # None: the passage keeps no annotation this generation
    score: float | None
    reason: str


def convergence_score(votes: list[tuple[str, float]], weights: dict[str, float]) -> float | None:
    """votes: (critic, score) of the valid critiques of one annotation, score = P(survives) +
    0.5 P(revise) of the critic's verdict (1, 0.5 or 0 for a verdict read without a distribution)."""
    total = sum(weights.get(critic, PRIOR_WEIGHT) for critic, _ in votes)
    if not votes or total <= 0:
        return None
    return sum(weights.get(critic, PRIOR_WEIGHT) * score for critic, score in votes) / total


def score_annotations(accepted: list[tuple[str, str]], critiques: list[CritiqueRow],
                      weights: dict[str, float], gated: dict[tuple[str, str], tuple[int, int]] | None = None) -> list[Scored]:
    """accepted: (passage_id, annotator) of every valid annotation; gated: its (dropped,
    verified) claims by the faithfulness gates (claim_counts)."""
    gated = gated or {}
    votes: dict[tuple[str, str], list[tuple[str, float]]] = defaultdict(list)
    unsure: Counter[tuple[str, str]] = Counter()
    for c in critiques:
        if c.status == "accepted" and c.abstain:  # no vote: a person decides the critique (escalations)
            unsure[(c.passage_id, c.annotator)] += 1
        elif c.status == "accepted":
            score = c.score if c.score is not None else VERDICT_POINTS.get(c.verdict, 0.0)
            votes[(c.passage_id, c.annotator)].append((c.critic, score))
    return [Scored(pid, author, convergence_score(votes[(pid, author)], weights), len(votes[(pid, author)]),
                   *gated.get((pid, author), (0, 0)), unsure[(pid, author)])
            for pid, author in accepted]


def claim_counts(per_member: dict) -> dict[tuple[str, str], tuple[int, int]]:
    """(passage_id, annotator) -> (dropped, verified) claims of every accepted annotation."""
    return {(r.passage_id, name): (sum(c["verdict"] != "supported" for c in r.claim_checks or []),
                                   sum(c["verdict"] == "supported" for c in r.claim_checks or []))
            for name, rows in per_member.items() for r in rows if r.status == "accepted"}


def tie_break(passage_id: str, annotator: str) -> str:
    """A stable order among equally scored annotations that is not the config's order (a member
    added last, e.g. the model `ratchet loop` trained, must get to compete)."""
    return hashlib.sha256(f"{passage_id}\x1f{annotator}".encode()).hexdigest()


def select(passage_ids: list[str], scored: list[Scored], threshold: float, scrutinized: bool,
           member_order: list[str] | None = None, unscrutinized: str = "not scrutinized (ensemble.k = 0)") -> list[Selection]:
    """Per passage, the best annotation whose score is at or above the threshold, or none with the
    reason. Best: the fewest claims dropped by the faithfulness gates, then the most claims
    verified (facts about the text, where the critics' votes measured at chance), then the
    highest score, then more critiques, then tie_break. Unscrutinized (no critic, or none whose
    vote weighs anything), the gates' counts and then tie_break pick one, and `unscrutinized`
    is the reason."""
    by_passage: dict[str, list[Scored]] = defaultdict(list)
    for s in scored:
        by_passage[s.passage_id].append(s)
    out = []
    for pid in passage_ids:
        candidates = by_passage.get(pid, [])
        if not candidates:
            out.append(Selection(pid, None, None, "no valid annotation"))
            continue
        if not scrutinized:
            first = min(candidates, key=lambda s: (s.dropped, -s.verified, tie_break(pid, s.annotator)))
            out.append(Selection(pid, first.annotator, None, unscrutinized))
            continue
        rated = [s for s in candidates if s.score is not None]
        if not rated:
            out.append(Selection(pid, None, None, "no vote: every critic was too unsure (its critique waits for a person)"
                                 if any(s.abstained for s in candidates) else "no valid critique"))
            continue
        passing = [s for s in rated if s.score >= threshold]
        if passing:
            best = min(passing, key=lambda s: (s.dropped, -s.verified, -s.score, -s.critiques, tie_break(pid, s.annotator)))
            out.append(Selection(pid, best.annotator, best.score, "converged"))
        else:
            best = max(rated, key=lambda s: s.score)
            out.append(Selection(pid, None, best.score,
                                 f"below threshold: best score {best.score:.2f} ({best.annotator}) < {threshold:.2f}"))
    return out


def votes(critiques: list[CritiqueRow]) -> list[CritiqueRow]:
    """The critiques that voted: valid, and not abstained (a critic too unsure of its verdict
    gave none; a person decides it), so no agreement is counted that the score never saw."""
    return [c for c in critiques if c.status == "accepted" and not c.abstain]


def alpha(critiques: list[CritiqueRow]) -> float | None:
    """Krippendorff's alpha (nominal) of the critics' votes: units are annotations, coders
    are critics. None where it is undefined (no annotation with two votes, or no variation)."""
    valid = votes(critiques)
    units = sorted({(c.passage_id, c.annotator) for c in valid})
    coders = sorted({c.critic for c in valid})
    if len(coders) < 2 or not units:
        return None
    col, row = {u: j for j, u in enumerate(units)}, {c: i for i, c in enumerate(coders)}
    data = np.full((len(coders), len(units)), np.nan)
    for c in valid:
        data[row[c.critic], col[(c.passage_id, c.annotator)]] = VERDICTS.index(c.verdict)
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
    units: int  # annotations with at least two votes
    critiques: int  # votes: valid critiques that did not abstain


def _agreement(scope: str, member: str, critiques: list[CritiqueRow]) -> Agreement:
    valid = votes(critiques)
    per_unit: dict[tuple, int] = defaultdict(int)
    for c in valid:
        per_unit[(c.passage_id, c.annotator)] += 1
    return Agreement(scope, member, alpha(valid), sum(n >= 2 for n in per_unit.values()), len(valid))


def agreement(critiques: list[CritiqueRow]) -> list[Agreement]:
    """Alpha for the whole generation, per author (do critics agree about this member's work?)
    and per critic (over the annotations it critiqued, with the other critics of those)."""
    rows = [_agreement("generation", "*", critiques)]
    for author in sorted({c.annotator for c in critiques}):
        rows.append(_agreement("author", author, [c for c in critiques if c.annotator == author]))
    for critic in sorted({c.critic for c in critiques}):
        units = {(c.passage_id, c.annotator) for c in critiques if c.critic == critic}
        rows.append(_agreement("critic", critic, [c for c in critiques if (c.passage_id, c.annotator) in units]))
    return rows


# ---------------------------------------------------------------- the stage and its tables


@dataclass
class ConvergenceRow:
    generation: int
    passage_id: str
    annotator: str
    score: float | None = doc("weighted mean of P(survives) + 0.5 P(revise); NULL: not scrutinized or no valid critique")
    critiques: int = doc("valid critiques behind the score")
    selected: bool


@dataclass
class SelectionRow:
    generation: int
    passage_id: str
    annotator: str | None
    score: float | None
    reason: str


@dataclass
class AgreementRow:
    generation: int
    scope: str = doc("generation | author | critic")
    member: str = doc("'*' for the whole generation")
    alpha: float | None = doc("NULL where undefined (no annotation with two votes, no variation)")
    units: int = doc("annotations with at least two votes (valid critiques whose critic did not abstain)")
    critiques: int = doc("the votes counted: an abstained critique is no vote")


CONVERGENCE = Table("convergence", ConvergenceRow, key=("generation", "passage_id", "annotator"),
                    doc="converge: one score per accepted annotation")
SELECTIONS = Table("selections", SelectionRow, key=("generation", "passage_id"),
                   doc="the annotation each passage keeps, or none and why")
AGREEMENT = Table("agreement", AgreementRow, key=("generation", "scope", "member"),
                  doc="Krippendorff's alpha (nominal) of the critics' verdicts")


class Converge(Stage):
    name = "converge"
    tables = (CONVERGENCE, SELECTIONS, AGREEMENT)

    def run(self, ctx: BuildContext) -> dict:
        g, ensemble = ctx.generation, ctx.ensemble
        weights = stage_weights(ctx, g)
        ctx.scored = score_annotations([(pid, author) for pid, author, _ in ctx.accepted], ctx.critiques, weights,
                                       claim_counts(ctx.per_member))
        ids = list(dict.fromkeys(p.passage_id for p in ctx.passages))
        judges = [c.name for c in ensemble.critics] + [v.name for v in ensemble.verifiers]
        informative = [n for n in judges if weights.get(n, PRIOR_WEIGHT) > 0]
        asked = ensemble.k > 0 or bool(ensemble.verifiers)
        ctx.selections = select(ids, ctx.scored, ctx.cfg.ensemble.threshold, asked and bool(informative),
                                [m.name for m in ensemble.annotators],
                                "no informative critic (every vote weight 0): chosen by the faithfulness gates"
                                if asked else "not scrutinized (ensemble.k = 0)")
        ctx.agreements = agreement(ctx.critiques) if ctx.critiques else []
        chosen = {(s.passage_id, s.annotator) for s in ctx.selections if s.annotator}
        CONVERGENCE.replace_generation(ctx.con, g, [
            ConvergenceRow(g, s.passage_id, s.annotator, s.score, s.critiques, (s.passage_id, s.annotator) in chosen)
            for s in ctx.scored])
        SELECTIONS.replace_generation(ctx.con, g, [SelectionRow(g, s.passage_id, s.annotator, s.score, s.reason)
                                                   for s in ctx.selections])
        AGREEMENT.replace_generation(ctx.con, g, [AgreementRow(g, a.scope, a.member, a.alpha, a.units, a.critiques)
                                                  for a in ctx.agreements])
        return {"ensemble": ensemble_metrics(ctx)}


def ensemble_metrics(ctx: BuildContext) -> dict:
    """What the summary, the manifest and the card say about the ensemble."""
    ensemble, critiques, selections = ctx.ensemble, ctx.critiques, ctx.selections
    selected = Counter(s.annotator for s in selections if s.annotator)
    scores: dict[str, list[float]] = {}
    for s in ctx.scored:
        if s.score is not None:
            scores.setdefault(s.annotator, []).append(s.score)
    members = {}
    for m in [*ensemble.members, *ensemble.verifiers]:
        rows = ctx.per_member.get(m.name, [])
        mine = [c for c in critiques if c.critic == m.name and c.status == "accepted"]
        given = [c.score for c in mine if c.score is not None]
        members[m.name] = {
            "family": m.family, "persona": m.persona, "roles": m.roles,
            "accepted": sum(r.status == "accepted" for r in rows), "rejected": sum(r.status == "rejected" for r in rows),
            "selected": selected.get(m.name, 0),
            "mean_score": round(sum(scores[m.name]) / len(scores[m.name]), 3) if scores.get(m.name) else None,
            "critiques": len(mine), "survives_given": sum(c.verdict == "survives" for c in mine),
            # the critic's scores as a distribution: a critic whose scores do not spread tells nothing apart
            "score_given_mean": round(statistics.fmean(given), 3) if given else None,
            "score_given_sd": round(statistics.stdev(given), 3) if len(given) > 1 else None,
            "read_by": sorted({c.method for c in mine if c.method})}
    reasons = Counter(s.reason.split(":")[0] for s in selections if not s.annotator)
    return {
        "k": ensemble.k, "threshold": ctx.cfg.ensemble.threshold, "families": ensemble.families, "members": members,
        "critiques": sum(c.status == "accepted" for c in critiques),
        "invalid_critiques": sum(c.status != "accepted" for c in critiques),
        "verdicts": dict(sorted(Counter(c.verdict for c in critiques if c.verdict).items())),
        "selected": sum(1 for s in selections if s.annotator), "not_selected": dict(sorted(reasons.items())),
        "agreement": {("generation" if a.scope == "generation" else f"{a.scope}:{a.member}"): a.alpha
                      for a in ctx.agreements},
        "warnings": ensemble.warnings(),
    }
