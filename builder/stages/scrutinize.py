"""Scrutinize: every accepted annotation is critiqued by k ensemble members that differ from
its author. A critic sees the passage and the annotation, never who wrote it; its output
follows schemas/critique.schema.json, narrowed so that it gives exactly one verdict per claim."""
from __future__ import annotations

from dataclasses import dataclass

from ..prompts import Prompts
from ..resources import load_schema
from ..structured import Outcome
from ..tables import Json, Table, doc
from .base import BuildContext, ModelTask, Sampling, Stage, run_task

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
    weight: float = doc("the critic's vote weight (reputation from earlier generations)")
    reason: str | None
    attempts: int
    call_key: str | None


CRITIQUES = Table("critiques", CritiqueRow, key=("generation", "passage_id", "annotator", "critic"),
                  doc="scrutinize: each accepted annotation, critiqued by k other members")


def critique_schema(n_claims: int) -> dict:
    """The critique schema with claim_verdicts narrowed to exactly n_claims entries."""
    schema = load_schema("critique")
    verdicts = {**schema["properties"]["claim_verdicts"], "minItems": n_claims, "maxItems": n_claims}
    return {**schema, "properties": {**schema["properties"], "claim_verdicts": verdicts}}


class CritiqueTask(ModelTask[Task, CritiqueRow]):
    """One critic (a Member) on many annotations: one batch, so the shared instructions stay
    the engine's cached prefix."""

    def __init__(self, prompts: Prompts, sampling: Sampling, generation: int, critic, weight: float = PRIOR_WEIGHT,
                 label: str | None = None):
        super().__init__(sampling, label=label or f"critique ({critic.name})")
        self.prompts, self.generation, self.critic, self.weight = prompts, generation, critic, weight

    def schema(self, t: Task) -> dict:
        return critique_schema(len(t.record["claims"]))

    def format_input(self, t: Task) -> tuple[dict, ...]:
        return self.prompts.critique_messages(t.passage, t.record, persona=self.critic.persona)

    def format_output(self, t: Task, o: Outcome) -> CritiqueRow:
        rec = o.record or {}
        return CritiqueRow(self.generation, t.passage_id, t.author, self.critic.name, o.status, rec.get("verdict"),
                           rec.get("claim_verdicts"), rec.get("objections"), self.weight, o.reason, o.attempts,
                           o.call_key)


def critique(tasks: list[Task], critic, engine, prompts: Prompts, config, on_progress=None,
             generation: int = 0) -> list[CritiqueRow]:
    """One critic (a Member) on many annotations outside a build (benches, tests)."""
    return run_task(CritiqueTask(prompts, critic_sampling(config, critic), generation, critic), tasks, engine,
                    on_progress)


def critic_sampling(cfg, critic) -> Sampling:
    return Sampling.of(cfg, cfg.ensemble.critic_max_tokens, critic.temperature)


class Scrutinize(Stage):
    name = "scrutinize"
    tables = (CRITIQUES,)

    def run(self, ctx: BuildContext) -> None:
        ctx.critiques = []
        ensemble = ctx.ensemble
        if ensemble.k > 0:
            weights = reputation_weights(ctx.con, ctx.generation)
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
                                        weights.get(name, PRIOR_WEIGHT))
                    ctx.critiques += run_task(task, tasks, ctx.engine(critic.backend), advance)
        CRITIQUES.replace_generation(ctx.con, ctx.generation, ctx.critiques)
        return None


def reputation_weights(con, generation: int) -> dict[str, float]:
    """Each member's latest reputation from generations before this one: this generation's
    audit sample is secret, and nothing published may depend on which items it holds."""
    return dict(con.execute("""SELECT annotator, arg_max(mean, generation) FROM reputation
                               WHERE generation < ? GROUP BY annotator""", [generation]).fetchall())
