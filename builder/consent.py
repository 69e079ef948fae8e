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
from collections.abc import Callable
from dataclasses import dataclass

from .backends.base import Request
from .prompts import Prompts
from .resources import load_schema
from .structured import Outcome, generate_valid, retry_sampling


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

    @property
    def answer(self) -> str | None:
        return self.outcome.record["consent"] if self.outcome.record else None


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


def ask(examples: list[Example], judge: str, engine, prompts: Prompts, config,
        on_progress: Callable[[int], None] | None = None) -> list[Consent]:
    """One judge answers for every example. An example without a valid answer after every
    retry is vetoed (consent.on_invalid = "veto": consent not given) or abstained on."""
    schema = load_schema("consent")
    s = config.sampling

    def make_request(i: int, attempt: int) -> Request:
        e = examples[i]
        return Request(prompts.consent_messages(e.context, e.context_text, e.target, e.target_text), schema,
                       max_tokens=config.consent.max_tokens, temperature=retry_sampling(s.temperature, attempt),
                       top_p=s.top_p, repeat_penalty=s.repeat_penalty, seed=s.seed + attempt)

    outcomes = generate_valid(len(examples), make_request, engine, config.annotate.retries,
                              on_done=(lambda i, o: on_progress(1)) if on_progress else None)
    out = []
    for e, o in zip(examples, outcomes):
        if o.record:
            o.record["trait_tag"] = tag(o.record["trait_tag"])
            veto = o.record["consent"] == "no"
        else:
            veto = config.consent.on_invalid == "veto"
        out.append(Consent(e.split, e.example_id, judge, o, veto))
    return out


def drift_events(consents: list[Consent]) -> list[DriftEvent]:
    """Examples on which judges with a valid answer did not all say the same."""
    by_example: dict[tuple[str, str], list[Consent]] = {}
    for c in consents:
        by_example.setdefault((c.split, c.example_id), []).append(c)
    events = []
    for (split, example_id), cs in sorted(by_example.items()):
        answered = [c for c in cs if c.answer]
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
    for c in consents:
        j = judges.setdefault(c.judge, {"examples": 0, "vetoes": 0, "invalid": 0})
        j["examples"] += 1
        j["vetoes"] += c.veto
        j["invalid"] += c.outcome.record is None
    for j in judges.values():
        j["veto_rate"] = round(j["vetoes"] / j["examples"], 3) if j["examples"] else None
    gone = vetoed(consents)
    examples = {(c.split, c.example_id) for c in consents}
    kept_tags = Counter(c.outcome.record["trait_tag"] for c in consents
                        if c.outcome.record and (c.split, c.example_id) not in gone)
    return {"judges": dict(sorted(judges.items())), "examples": len(examples),
            "vetoed": dict(sorted(Counter(split for split, _ in gone).items())),
            "drift_events": len(events),
            "trait_tags": dict(kept_tags.most_common(top))}
