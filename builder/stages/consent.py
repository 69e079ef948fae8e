"""Consent gate: frozen checkpoints must consent to every example bound for a training split.

Each judge (config key consent.judges) sees every sft reflection (with its passage) and every
dpo pair's chosen response (with its request) and answers with schemas/consent.schema.json:
the persona or trait training on it would reinforce (free text and a short tag), its
reasons, then `yes` or `no`. A `no` from any judge vetoes the example; the reason is kept.
Where judges with a valid answer disagree, a drift event records the example, the
checkpoints and what each said: a later checkpoint drifting from an earlier one shows up
there instead of passing unnoticed.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from ..config import model_short_name
from ..prompts import Prompts
from ..structured import Outcome
from ..tables import Json, Table, doc
from .base import BuildContext, JudgingTask, Sampling, Stage, abstains, graded_columns, run_task


@dataclass
class Example:
    """One example bound for a training split, as a judge sees it."""
    split: str  # sft | dpo
    example_id: str  # sft: the passage id; dpo: ITEM_ID:FRAMEWORK
    context: str  # PASSAGE | REQUEST
    context_text: str
    target: str  # REFLECTION | RESPONSE
    target_text: str


@dataclass
class Consent:
    split: str
    example_id: str
    judge: str
    outcome: Outcome
    veto: bool
    unsure: bool = False  # its answer was too close to call (judges.abstain_below): read as no valid answer

    @property
    def answer(self) -> str | None:
        """The deciding answer: the most likely under the deciding distribution (else the written one)."""
        if not self.outcome.record:
            return None
        return self.outcome.graded.decided if self.outcome.graded else self.outcome.record["consent"]

    @property
    def p_no(self) -> float | None:
        return self.outcome.graded.p("no") if self.outcome.graded else None


@dataclass
class DriftEvent:
    split: str
    example_id: str
    judges: list[str]
    said: dict[str, dict]  # judge -> {consent, trait_tag, reasons}


def tag(text: str) -> str:
    """A trait tag as a slug: lowercase words joined by hyphens, at most three."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words[:3]) or "none"


class ConsentTask(JudgingTask[Example, Consent]):
    """One judge answers for every example: a veto is P(no) above consent.veto_threshold. An
    example without a valid answer after every retry is vetoed (consent.on_invalid = "veto":
    consent not given) or abstained on; so is one whose answer the judge was too unsure of
    (judges.abstain_below: max(P(yes), P(no)) below it), since it gives no decision either."""
    schema_name = "consent"
    field, choices = "consent", ("yes", "no")

    def __init__(self, prompts: Prompts, config, judge: str):
        super().__init__(Sampling.of(config, config.consent.max_tokens), label=f"consent ({judge})")
        self.prompts, self.judge, self.on_invalid = prompts, judge, config.consent.on_invalid
        self.threshold, self.judging, self.judges = config.consent.veto_threshold, config.judgements, config.judges

    def content_free(self, text: str) -> Example:
        return Example("sft", "content-free", "PASSAGE", text, "REFLECTION", text)

    def format_input(self, e: Example) -> tuple[dict, ...]:
        return self.prompts.consent_messages(e.context, e.context_text, e.target, e.target_text)

    def format_output(self, e: Example, o: Outcome) -> Consent:
        if o.record:
            o.record["trait_tag"] = tag(o.record["trait_tag"])
        unsure = abstains(o, self.judges)
        if o.record and not unsure:
            veto = o.graded.p("no") > self.threshold if o.graded else o.record["consent"] == "no"
        else:  # no decision: none written, or one too close to call
            veto = self.on_invalid == "veto"
        return Consent(e.split, e.example_id, self.judge, o, veto, unsure)


def ask(examples: list[Example], judge: str, engine, prompts: Prompts, config, on_progress=None) -> list[Consent]:
    return run_task(ConsentTask(prompts, config, judge), examples, engine, on_progress)


def drift_events(consents: list[Consent]) -> list[DriftEvent]:
    """Examples on which judges with a valid answer did not all say the same."""
    by_example: dict[tuple[str, str], list[Consent]] = {}
    for c in consents:
        by_example.setdefault((c.split, c.example_id), []).append(c)
    events = []
    for (split, example_id), cs in sorted(by_example.items()):
        answered = [c for c in cs if c.answer and not c.unsure]
        if len({c.answer for c in answered}) > 1:
            events.append(DriftEvent(split, example_id, sorted(c.judge for c in answered),
                                     {c.judge: {k: c.outcome.record[k] for k in ("consent", "trait_tag", "reasons")}
                                      for c in sorted(answered, key=lambda c: c.judge)}))
    return events


def vetoed(consents: list[Consent]) -> set[tuple[str, str]]:
    return {(c.split, c.example_id) for c in consents if c.veto}


def consent_metrics(consents: list[Consent], events: list[DriftEvent], top: int = 5) -> dict:
    """Veto rate per judge, examples vetoed per split, drift events and the traits most
    reinforced by the examples that go to training."""
    judges: dict[str, dict] = {}
    p_no: dict[str, list[float]] = {}
    for c in consents:
        j = judges.setdefault(c.judge, {"examples": 0, "vetoes": 0, "invalid": 0, "unsure": 0})
        j["examples"] += 1
        j["vetoes"] += c.veto
        j["invalid"] += c.outcome.record is None
        j["unsure"] += c.unsure
        if c.p_no is not None:
            p_no.setdefault(c.judge, []).append(c.p_no)
    for name, j in judges.items():
        j["veto_rate"] = round(j["vetoes"] / j["examples"], 3) if j["examples"] else None
        j["mean_p_no"] = round(sum(p_no[name]) / len(p_no[name]), 3) if p_no.get(name) else None
    gone = vetoed(consents)
    examples = {(c.split, c.example_id) for c in consents}
    kept_tags = Counter(c.outcome.record["trait_tag"] for c in consents
                        if c.outcome.record and (c.split, c.example_id) not in gone)
    return {"judges": dict(sorted(judges.items())), "examples": len(examples),
            "vetoed": dict(sorted(Counter(split for split, _ in gone).items())),
            "drift_events": len(events),
            "trait_tags": dict(kept_tags.most_common(top))}


# ---------------------------------------------------------------- the stage and its tables


@dataclass
class ConsentRow:
    generation: int
    split: str = doc("sft | dpo")
    example_id: str = doc("sft: passage id; dpo: ITEM_ID:FRAMEWORK")
    judge: str
    status: str = doc("accepted | rejected (no valid answer)")
    consent: str | None = doc("yes | no")
    veto: bool = doc("excluded by this judge (a no, or no answer under on_invalid = veto)")
    trait: str | None = doc("the persona or trait training on it would reinforce")
    trait_tag: str | None
    reasons: Json | None
    reason: str | None
    attempts: int
    call_key: str | None
    p_no: float | None = doc("P(no) under the deciding distribution: a veto when above consent.veto_threshold",
                             default=None, added=True)
    probs: Json | None = doc("the answer's distribution as read", default=None, added=True)
    calibrated: Json | None = doc("probs divided by the content-free baseline", default=None, added=True)
    method: str | None = doc("logprobs | samples | scripted | decoded", default=None, added=True)
    abstain: bool | None = doc("the judge was too unsure of its answer (judges.abstain_below): read as no valid "
                               "answer, so consent.on_invalid decides the veto", default=False, added=True)


@dataclass
class DriftRow:
    generation: int
    split: str
    example_id: str
    judges: Json = doc("the checkpoints that answered")
    said: Json = doc("judge -> {consent, trait_tag, reasons}")


CONSENTS = Table("consents", ConsentRow, key=("generation", "split", "example_id", "judge"),
                 doc="the consent gate: each judge's answer per training example")
DRIFT_EVENTS = Table("drift_events", DriftRow, key=("generation", "split", "example_id"),
                     doc="consent judges that disagreed on an example")


def consent_row(generation: int, c: Consent) -> ConsentRow:
    o = c.outcome
    return ConsentRow(generation, c.split, c.example_id, c.judge, o.status, c.answer, c.veto,
                      (o.record or {}).get("trait"), (o.record or {}).get("trait_tag"),
                      o.record["reasons"] if o.record else None, o.reason, o.attempts, o.call_key, c.p_no,
                      *graded_columns(o), c.unsure)


def training_examples(ctx: BuildContext) -> list[Example]:
    """What the consent judges see: each kept reflection with its passage (sft) and each DPO
    pair's chosen response with its request (dpo)."""
    text = ctx.text()
    records = {(pid, author): record for pid, author, record in ctx.accepted}
    out = [Example("sft", s.passage_id, "PASSAGE", text[s.passage_id], "REFLECTION",
                   ctx.prompts.reflection(records[(s.passage_id, s.annotator)])) for s in ctx.selections if s.annotator]
    out += [Example("dpo", f"{p.item.item_id}:{p.framework}", "REQUEST", p.item.prompt, "RESPONSE", p.chosen)
            for p in ctx.pairs if p.kept]
    return out


def ask_judges(ctx: BuildContext, examples: list[Example]) -> tuple[list, dict]:
    """Every example to every consent judge (an unchanged judge answers from the cache): the
    consents, and each judge's checkpoint as its engine describes it."""
    consents, checkpoints = [], {}
    for model in ctx.cfg.consent.judges if examples else []:
        name = model_short_name(model)
        engine = ctx.judge_engine(model, "consent.judges")
        checkpoints[name] = engine.backend.describe()
        consents += ctx.run(ConsentTask(ctx.prompts, ctx.cfg, name), examples, engine)
    return consents, checkpoints


def drift_rows(generation: int, consents: list) -> list[DriftRow]:
    return [DriftRow(generation, e.split, e.example_id, e.judges, e.said) for e in drift_events(consents)]


class ConsentGate(Stage):
    """Every training example to every consent judge; vetoes and drift events to DuckDB."""
    name = "consent"
    tables = (CONSENTS, DRIFT_EVENTS)

    def run(self, ctx: BuildContext) -> dict:
        g, judges = ctx.generation, ctx.cfg.consent.judges
        ctx.examples = training_examples(ctx)
        consents, checkpoints = ask_judges(ctx, ctx.examples)
        events = drift_events(consents)
        CONSENTS.replace_generation(ctx.con, g, [consent_row(g, c) for c in consents])
        DRIFT_EVENTS.replace_generation(ctx.con, g, drift_rows(g, consents))
        if not judges:
            return {"consent": None}
        ctx.log.info("consent: %d examples, %d judges, %d drift events", len(ctx.examples), len(judges), len(events))
        return {"consent": {**consent_metrics(consents, events), "checkpoints": checkpoints}}
