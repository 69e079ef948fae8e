"""Scrutinize: every accepted annotation is critiqued by k ensemble members that differ from
its author. A critic sees the passage and the annotation, never who wrote it; its output
follows schemas/critique.schema.json, narrowed so that it gives exactly one verdict per claim."""
from __future__ import annotations

from dataclasses import dataclass

from .. import verifier
from ..prompts import Prompts
from ..resources import load_schema
from ..structured import Outcome
from ..tables import Json, Table, doc
from .base import BuildContext, JudgingTask, Sampling, Stage, run_task

PRIOR_WEIGHT = 0.5  # mean of Beta(1, 1): a member never audited, no evidence either way


@dataclass
class Task:
    """One annotation to critique."""
    passage_id: str
    passage: str
    author: str  # never shown to the critic (the ratchet panel puts the reflection's key here)
    record: dict


@dataclass
class CritiqueRow:
    generation: int
    passage_id: str
    annotator: str = doc("the author (never shown to the critic)")
    critic: str
    status: str = doc("accepted | rejected (no valid critique after every retry)")
    verdict: str | None = doc("survives | revise | reject")
    claim_verdicts: Json | None = doc("sound | doubtful | wrong, one per claim")
    objections: Json | None
    weight: float = doc("the critic's vote weight (its audited record as a critic, from earlier generations)")
    reason: str | None
    attempts: int
    call_key: str | None
    score: float | None = doc("P(survives) + 0.5 P(revise) under the deciding distribution", default=None, added=True)
    probs: Json | None = doc("the verdict's distribution as read from the engine", default=None, added=True)
    calibrated: Json | None = doc("probs divided by the content-free baseline, normalised", default=None, added=True)
    method: str | None = doc("how probs were read: logprobs | samples | scripted | decoded", default=None, added=True)


CRITIQUES = Table("critiques", CritiqueRow, key=("generation", "passage_id", "annotator", "critic"),
                  doc="scrutinize: each accepted annotation, critiqued by k other members")


def critique_schema(n_claims: int) -> dict:
    """The critique schema with claim_verdicts narrowed to exactly n_claims entries."""
    schema = load_schema("critique")
    verdicts = {**schema["properties"]["claim_verdicts"], "minItems": n_claims, "maxItems": n_claims}
    return {**schema, "properties": {**schema["properties"], "claim_verdicts": verdicts}}


VERDICT_POINTS = {"survives": 1.0, "revise": 0.5, "reject": 0.0}


def verdict_score(graded) -> float | None:
    """P(survives) + 0.5 P(revise): a critic's vote as one number in 0..1."""
    return None if graded is None else round(sum(graded.p(v) * pts for v, pts in VERDICT_POINTS.items()), 6)


def content_free_record(text: str) -> dict:
    """An annotation with nothing in it, for calibration (one claim: the schema needs one)."""
    return {"claims": [{"claim": text, "evidence": text, "kind": "fact", "support": "none", "confidence": "low"}],
            "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [], "reflection": text}


class CritiqueTask(JudgingTask[Task, CritiqueRow]):
    """One critic (a Member) on many annotations: one batch, so the shared instructions stay
    the engine's cached prefix."""

    field, choices = "verdict", tuple(VERDICT_POINTS)

    def __init__(self, prompts: Prompts, sampling: Sampling, generation: int, critic, weight: float = PRIOR_WEIGHT,
                 label: str | None = None, judging=None):
        super().__init__(sampling, label=label or f"critique ({critic.name})")
        self.prompts, self.generation, self.critic, self.weight = prompts, generation, critic, weight
        self.judging = judging

    def content_free(self, text: str) -> Task:
        return Task("content-free", text, "", content_free_record(text))

    def schema(self, t: Task) -> dict:
        return critique_schema(len(t.record["claims"]))

    def format_input(self, t: Task) -> tuple[dict, ...]:
        return self.prompts.critique_messages(t.passage, t.record, persona=self.critic.persona)

    def format_output(self, t: Task, o: Outcome) -> CritiqueRow:
        rec, g = o.record or {}, o.graded
        return CritiqueRow(self.generation, t.passage_id, t.author, self.critic.name, o.status, rec.get("verdict"),
                           rec.get("claim_verdicts"), rec.get("objections"), self.weight, o.reason, o.attempts,
                           o.call_key, verdict_score(g), g.raw if g else None, g.calibrated if g else None,
                           g.method if g else None)


def critique(tasks: list[Task], critic, engine, prompts: Prompts, config, on_progress=None,
             generation: int = 0) -> list[CritiqueRow]:
    """One critic (a Member) on many annotations outside a build (benches, tests)."""
    return run_task(CritiqueTask(prompts, critic_sampling(config, critic), generation, critic,
                                 judging=config.judgements), tasks, engine, on_progress)


def critic_sampling(cfg, critic) -> Sampling:
    return Sampling.of(cfg, cfg.ensemble.critic_max_tokens, critic.temperature)


class Scrutinize(Stage):
    name = "scrutinize"
    tables = (CRITIQUES,)

    def run(self, ctx: BuildContext) -> None:
        ctx.critiques = []
        ensemble = ctx.ensemble
        weights = vote_weights(ctx.con, ctx.generation, ctx.cfg.audit.vote_weights)
        if ensemble.k > 0:
            text = ctx.text()
            by_name = {m.name: m for m in ensemble.members}
            work: dict[str, list[Task]] = {c.name: [] for c in ensemble.critics}
            for pid, author, record in ctx.accepted:
                for critic in ensemble.critics_for(by_name[author], pid):
                    work[critic.name].append(Task(pid, text[pid], author, record))
            advance = ctx.step("critique", sum(len(t) for t in work.values()))
            for name, tasks in work.items():  # one batch per critic: its instructions stay the cached prefix
                if tasks:
                    critic = by_name[name]
                    task = CritiqueTask(ctx.prompts, critic_sampling(ctx.cfg, critic), ctx.generation, critic,
                                        weights.get(name, PRIOR_WEIGHT), judging=ctx.cfg.judgements)
                    ctx.critiques += ctx.run(task, tasks, ctx.engine(critic.backend), advance)
        for v in ensemble.verifiers:  # no model call: every accepted annotation, on top of the k critics
            text = ctx.text()
            ctx.critiques += [verifier_row(ctx.generation, v.name, Task(pid, text[pid], author, record),
                                           weights.get(v.name, PRIOR_WEIGHT)) for pid, author, record in ctx.accepted]
        CRITIQUES.replace_generation(ctx.con, ctx.generation, ctx.critiques)
        return None


def verifier_row(generation: int, name: str, t: Task, weight: float = PRIOR_WEIGHT) -> CritiqueRow:
    """The grounding verifier's critique of one annotation, as a critic's row."""
    c = verifier.check(t.passage, t.record)
    return CritiqueRow(generation, t.passage_id, t.author, name, "accepted", c.verdict, c.claim_verdicts, c.objections,
                       weight, None, 0, None, c.share, c.probs, None, verifier.KIND)


def vote_weights(con, generation: int, source: str = "audits") -> dict[str, float]:
    """Each member's vote weight: the mean of its record as a critic (the Beta posterior of its
    critiques judged right, stages/audit.py) over every critique audit of generations before
    this one (`audit.vote_weights`: "audits" every auditor's, "human" people's only, "prior"
    none: every vote weighs the same). Its record as an annotator does not weigh its votes:
    writing well and judging well are different skills, and a member that only critiques has
    audits too. Earlier generations only: this generation's audit sample is secret, and nothing
    published may depend on which items it holds."""
    from .audit import KINDS, critic_record_means

    if source == "prior" or generation <= 1:
        return {}
    return critic_record_means(con, generation - 1, KINDS if source == "audits" else ["human"])
