"""Scrutinize: every accepted annotation is critiqued by k ensemble members that differ from
its author. A critic sees the passage and the annotation, never who wrote it; its output
follows schemas/critique.schema.json, narrowed so that it gives exactly one verdict per claim."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

from .. import verifier
from ..prompts import Prompts
from ..resources import load_schema
from ..structured import Outcome
from ..tables import Json, Table, doc
from .base import BuildContext, JudgingTask, Sampling, Stage, abstains, run_task
from .reputation import KINDS, critic_record_counts, critic_record_means

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
    abstain: bool | None = doc("the critic was too unsure to vote: its likeliest verdict's probability was below "
                               "judges.abstain_below; its vote is left out and a person decides (escalations)",
                               default=False, added=True)


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
                 label: str | None = None, judging=None, judges=None):
        super().__init__(sampling, label=label or f"critique ({critic.name})")
        self.prompts, self.generation, self.critic, self.weight = prompts, generation, critic, weight
        self.judging, self.judges = judging, judges  # judges: config.JudgesConfig (when to abstain); None: never

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
                           g.method if g else None, abstains(o, self.judges))


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

    def run(self, ctx: BuildContext) -> dict:
        ctx.critiques = []
        ensemble = ctx.ensemble
        weights = stage_weights(ctx, ctx.generation)
        silent = frozenset(name for name, w in weights.items() if w <= 0)
        if ensemble.k > 0:
            text = ctx.text()
            by_name = {m.name: m for m in ensemble.members}
            work: dict[str, list[Task]] = {c.name: [] for c in ensemble.critics}
            for pid, author, record in ctx.accepted:
                for critic in ensemble.critics_for(by_name[author], pid, silent):
                    work[critic.name].append(Task(pid, text[pid], author, record))
            advance = ctx.step("critique", sum(len(t) for t in work.values()))
            for name, tasks in work.items():  # one batch per critic: its instructions stay the cached prefix
                if tasks:
                    critic = by_name[name]
                    task = CritiqueTask(ctx.prompts, critic_sampling(ctx.cfg, critic), ctx.generation, critic,
                                        weights.get(name, PRIOR_WEIGHT), judging=ctx.cfg.judgements,
                                        judges=ctx.cfg.judges)
                    ctx.critiques += ctx.run(task, tasks, ctx.engine(critic.backend), advance)
        for v in (v for v in ensemble.verifiers if v.name not in silent):  # every accepted annotation, on top of the k critics
            text = ctx.text()
            ctx.critiques += [verifier_row(ctx.generation, v.name, Task(pid, text[pid], author, record),
                                           weights.get(v.name, PRIOR_WEIGHT)) for pid, author, record in ctx.accepted]
        CRITIQUES.replace_generation(ctx.con, ctx.generation, ctx.critiques)
        judges = [c.name for c in ensemble.critics] + [v.name for v in ensemble.verifiers]
        return {"votes": {"weights_from": ctx.cfg.audit.vote_weights,
                          "weight": {n: round(weights.get(n, PRIOR_WEIGHT), 3) for n in judges},
                          "not_asked": sorted(n for n in judges if n in silent),
                          "abstained": sum(bool(c.abstain) for c in ctx.critiques)}}


def verifier_row(generation: int, name: str, t: Task, weight: float = PRIOR_WEIGHT) -> CritiqueRow:
    """The grounding verifier's critique of one annotation, as a critic's row."""
    c = verifier.check(t.passage, t.record)
    return CritiqueRow(generation, t.passage_id, t.author, name, "accepted", c.verdict, c.claim_verdicts, c.objections,
                       weight, None, 0, None, c.share, c.probs, None, verifier.KIND)


def vote_weights(con, generation: int, source: str = "validity",
                 measured: dict[str, "Measured"] | None = None) -> dict[str, float]:
    """Each critic's vote weight (`audit.vote_weights`):
    validity  what it has shown on labelled claims (`ratchet validity`, validity.vote_weight: 0 at
              or below chance), merged with people's critique audits as they come, each audit
              counting as much as one labelled claim; a critic never measured nor audited: 0.5
    human / audits  the mean of its record as a critic (the Beta posterior of its critiques
              judged right, stages/audit.py) over people's (or every auditor's) critique audits
    prior     none: every vote weighs the same.
    Audits of earlier generations only: this generation's audit sample is secret, and nothing
    published may depend on which items it holds. A member's record as an annotator does not
    weigh its votes: writing well and judging well are different skills."""
    audited = generation > 1 and source != "prior"
    if source != "validity":
        return critic_record_means(con, generation - 1, KINDS if source == "audits" else ["human"]) if audited else {}
    human = critic_record_counts(con, generation - 1, ["human"]) if audited else {}
    weights = {name: audited_weight(mean) for name, (n, mean) in human.items()}
    for name, m in (measured or {}).items():
        n, mean = human.get(name, (0, 0.5))
        weights[name] = round((m.n * m.weight + n * audited_weight(mean)) / (m.n + n), 4)
    return weights


def audited_weight(right_rate: float) -> float:
    """A rate of right verdicts on the scale of validity.vote_weight: 2 x rate - 1, floored at 0."""
    return round(max(0.0, 2 * right_rate - 1), 4)


# ---------------------------------------------------------------- measured validity


@dataclass
class Measured:
    critic: str = doc("the ensemble member measured (a model and persona, or the grounding verifier)")
    critic_key: str = doc("sha256 (16 hex) of its model's weights and what it is asked with (validity.critic_key): "
                          "the measurement holds for these only")
    labelled: str = doc("the labelled claims it judged (file name)")
    labelled_sha256: str
    n: Annotated[int, "BIGINT"] = doc("labelled claims judged")
    positives: Annotated[int, "BIGINT"] = doc("unsupported claims among them")
    auc: float | None = doc("P(it scores a supported claim above an unsupported one)")
    auc_low: float | None = doc("the AUC's 95% bootstrap interval")
    auc_high: float | None
    weight: float = doc("its vote weight: 2 x auc_low - 1, floored at 0 (0: not informative, not asked)")
    unjudged: Annotated[int, "BIGINT"] = doc("labelled claims without a valid critique")
    seconds: float = doc("time the measurement took (cached answers included)")
    measured_at: str = doc("UTC, ISO 8601")


CRITIC_VALIDITY = Table("critic_validity", Measured, key=("critic_key", "labelled_sha256"),
                        doc="`ratchet validity`: each critic measured on claims a person labelled; its vote weight")
SHIPPED_VALIDITY = "critic_validity.jsonl"  # beside the prompts: measured under them (`ratchet validity --write`)
CRITIQUE_PROMPT_FILES = ("critique.system.jinja", "critique.user.jinja", "critique.examples.jsonl", "reflection.jinja",
                         "audit_notice.txt")


def model_hash(backend) -> str:
    return backend.describe().get("sha256") or backend.model_id


def ensemble_critics(ensemble) -> list[tuple[str, str, str | None]]:
    """(name, persona, model hash) of every model critic of a loaded ensemble."""
    return [(c.name, c.persona, model_hash(c.backend)) for c in ensemble.critics]


def config_critics(cfg) -> list[tuple[str, str, str | None]]:
    """The same from the config alone, without starting an engine: the model file's sha256,
    None for a model that is no local GGUF file (known once a build loads it)."""
    from ..backends.registry import file_model_hash
    from ..models import ModelNotFound

    out = []
    for m in cfg.ensemble.members:
        if m.kind == "model" and "critique" in m.roles:
            try:
                digest = file_model_hash(m.engine(cfg.annotator))
            except (ModelNotFound, OSError):
                digest = None
            out.append((m.display_name, m.persona, digest))
    return out


def critic_keys(critics: list[tuple[str, str, str | None]], verifiers: list[str], prompts: Prompts, cfg) -> dict[str, str]:
    """name -> validity.critic_key of every critic (name, persona, model hash) and verifier."""
    from ..cache import sha256
    from ..validity import critic_key

    files = prompts.hashes([persona for _, persona, _ in critics])
    # What a critic judges differs with the faithfulness gates (on: every quote is already the
    # passage's, and the verifier has nothing left to see), so a measurement holds for one or the other.
    gates = {"gates": cfg.annotate.gates}
    asked = {**{n: files[n] for n in CRITIQUE_PROMPT_FILES}, "schema": sha256(load_schema("critique")),
             "decide_by": cfg.judgements.decide_by, **gates}
    keys = {name: critic_key(digest, {**asked, "persona": files[f"personas/{persona}.txt"]})
            for name, persona, digest in critics if digest}
    return keys | {name: critic_key(verifier.VERSION, gates) for name in verifiers}


def measured_validity(con, critics: list[tuple[str, str, str | None]], verifiers: list[str], prompts: Prompts,
                      cfg) -> dict[str, Measured]:
    """name -> the latest measurement of each critic: the workspace's own (`ratchet validity`)
    first, then the one shipped beside the prompts. Critics measured under other weights or
    prompts are not found here (unmeasured)."""
    keys = critic_keys(critics, verifiers, prompts, cfg)
    found = {}
    present = CRITIC_VALIDITY.exists(con)
    columns = [c.name for c in CRITIC_VALIDITY.columns]
    for row in CRITIC_VALIDITY.read(con, "list_contains(?, critic_key) ORDER BY measured_at", [list(keys.values())]) \
            if present else []:  # a workspace an older builder made, opened read-only, has no such table
        found[row.critic_key] = row
    for row in prompts.jsonl_rows(SHIPPED_VALIDITY):
        found.setdefault(row["critic_key"], Measured(**{c: row.get(c) for c in columns}))
    return {name: replace(found[key], critic=name) for name, key in keys.items() if key in found}


def stage_weights(ctx: BuildContext, generation: int) -> dict[str, float]:
    """The vote weights a build uses for `generation` (every stage reads the same)."""
    e = ctx.ensemble
    measured = measured_validity(ctx.con, ensemble_critics(e), [v.name for v in e.verifiers], ctx.prompts, ctx.cfg) \
        if ctx.cfg.audit.vote_weights == "validity" else {}
    return vote_weights(ctx.con, generation, ctx.cfg.audit.vote_weights, measured)
