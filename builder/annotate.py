"""Annotate: passages in, one validated epistemic reflection (or a recorded rejection) each,
per annotating member. Output follows schemas/annotation.schema.json (see structured.py for
validation and retries)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .backends.base import Request
from .config import RatchetConfig
from .corpus import Passage
from .prompts import Prompts
from .resources import load_schema
from .structured import generate_valid, retry_sampling

__all__ = ["AnnotationResult", "annotate"]


@dataclass
class AnnotationResult:
    passage_id: str
    status: str  # accepted | rejected
    record: dict | None
    reason: str | None
    attempts: int
    truncated: int
    call_key: str | None


def annotate(
    passages: Sequence[Passage],
    engine,
    prompts: Prompts,
    config: RatchetConfig,
    on_progress: Callable[[int], None] | None = None,
    persona: str = "default",
    temperature: float | None = None,
) -> list[AnnotationResult]:
    """Annotate every passage with `engine` (a cached backend) under one persona."""
    schema = load_schema("annotation")
    s = config.sampling
    base_temperature = s.temperature if temperature is None else temperature

    def make_request(i: int, attempt: int) -> Request:
        return Request(messages=prompts.annotation_messages(passages[i].text, mark=config.annotate.datamark, persona=persona),
                       schema=schema, max_tokens=s.max_tokens, temperature=retry_sampling(base_temperature, attempt),
                       top_p=s.top_p, repeat_penalty=s.repeat_penalty, seed=s.seed + attempt)

    outcomes = generate_valid(len(passages), make_request, engine, config.annotate.retries,
                              on_done=(lambda i, out: on_progress(1)) if on_progress else None)
    return [AnnotationResult(p.passage_id, o.status, o.record, o.reason, o.attempts, o.truncated, o.call_key)
            for p, o in zip(passages, outcomes)]
