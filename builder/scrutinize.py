"""Scrutinize: every accepted annotation is critiqued by k ensemble members that differ from
its author. A critic sees the passage and the annotation, never who wrote it; its output
follows schemas/critique.schema.json, narrowed so that it gives exactly one verdict per claim."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .backends.base import Request
from .config import RatchetConfig
from .prompts import Prompts
from .resources import load_schema
from .structured import generate_valid, retry_sampling


@dataclass
class Task:
    """One annotation to critique."""
    passage_id: str
    passage: str
    author: str
    record: dict


@dataclass
class CritiqueResult:
    passage_id: str
    author: str
    critic: str
    status: str  # accepted | rejected (no valid critique after every retry)
    verdict: str | None
    claim_verdicts: list[str] | None
    objections: list[str] | None
    reason: str | None
    attempts: int
    call_key: str | None


def critique_schema(n_claims: int) -> dict:
    """The critique schema with claim_verdicts narrowed to exactly n_claims entries."""
    schema = load_schema("critique")
    verdicts = {**schema["properties"]["claim_verdicts"], "minItems": n_claims, "maxItems": n_claims}
    return {**schema, "properties": {**schema["properties"], "claim_verdicts": verdicts}}


def critique(tasks: list[Task], critic, engine, prompts: Prompts, config: RatchetConfig,
             on_progress: Callable[[int], None] | None = None) -> list[CritiqueResult]:
    """One critic (a Member) critiques every task with `engine` (its cached backend). The
    tasks go as one batch: the shared instructions stay the engine's cached prefix."""
    s = config.sampling
    temperature = s.temperature if critic.temperature is None else critic.temperature

    def make_request(i: int, attempt: int) -> Request:
        t = tasks[i]
        return Request(messages=prompts.critique_messages(t.passage, t.record, persona=critic.persona),
                       schema=critique_schema(len(t.record["claims"])), max_tokens=config.ensemble.critic_max_tokens,
                       temperature=retry_sampling(temperature, attempt), top_p=s.top_p,
                       repeat_penalty=s.repeat_penalty, seed=s.seed + attempt)

    outcomes = generate_valid(len(tasks), make_request, engine, config.annotate.retries,
                              on_done=(lambda i, out: on_progress(1)) if on_progress else None)
    results = []
    for t, o in zip(tasks, outcomes):
        rec = o.record or {}
        results.append(CritiqueResult(t.passage_id, t.author, critic.name, o.status, rec.get("verdict"),
                                      rec.get("claim_verdicts"), rec.get("objections"), o.reason, o.attempts, o.call_key))
    return results
