"""Annotate: passages in, one validated epistemic reflection (or a recorded rejection) each.

Output is constrained to schemas/annotation.schema.json by the engine and validated again
here. An invalid output is retried with another seed, a bounded number of times; after
that the passage gets a rejection with its reason. Never a crash, never a silent drop.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jsonschema

from .backends.base import Request, Response
from .config import RatchetConfig
from .corpus import Passage
from .prompts import Prompts, unmark
from .resources import load_schema

RETRY_MIN_TEMPERATURE = 0.7  # a retry under greedy decoding would repeat the same output


@dataclass
class AnnotationResult:
    passage_id: str
    status: str  # accepted | rejected
    record: dict | None
    reason: str | None
    attempts: int
    truncated: int
    call_key: str | None


def check_output(response: Response, validator: jsonschema.Draft202012Validator) -> tuple[dict | None, str | None]:
    """(record, None) for a valid output, (None, reason) otherwise."""
    if response.finish_reason == "error":
        return None, f"engine error: {response.error}"
    if response.finish_reason == "length":
        return None, f"truncated: output hit the token limit after {response.completion_tokens} tokens"
    try:
        record = json.loads(response.text)
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at char {exc.pos}"
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return None, f"schema violation at {where}: {error.message[:200]}"
    return unmark(record), None


def annotate(
    passages: Sequence[Passage],
    engine,
    prompts: Prompts,
    config: RatchetConfig,
    on_progress: Callable[[int], None] | None = None,
) -> list[AnnotationResult]:
    """Run every passage through `engine` (a cached backend) in rounds: round 0 for all, then
    only the failures again with the next seed, up to `annotate.retries` extra rounds."""
    schema = load_schema("annotation")
    validator = jsonschema.Draft202012Validator(schema)
    s = config.sampling
    results: dict[str, AnnotationResult] = {
        p.passage_id: AnnotationResult(p.passage_id, "rejected", None, None, 0, 0, None) for p in passages}
    pending = list(passages)
    for attempt in range(config.annotate.retries + 1):
        if not pending:
            break
        temperature = s.temperature if attempt == 0 else max(s.temperature, RETRY_MIN_TEMPERATURE)
        requests = [
            Request(messages=prompts.annotation_messages(p.text, mark=config.annotate.datamark), schema=schema,
                    max_tokens=s.max_tokens, temperature=temperature, top_p=s.top_p,
                    repeat_penalty=s.repeat_penalty, seed=s.seed + attempt)
            for p in pending]
        failed: list[int] = []

        def on_response(i: int, response: Response) -> None:
            result = results[pending[i].passage_id]
            result.attempts += 1
            result.truncated += response.finish_reason == "length"
            record, reason = check_output(response, validator)
            if record is not None:
                result.status, result.record, result.reason = "accepted", record, None
                result.call_key = response.extra.get("cache_key")
                if on_progress:
                    on_progress(1)
            else:
                result.reason = reason
                failed.append(i)
                if attempt == config.annotate.retries and on_progress:
                    on_progress(1)

        engine.generate(requests, on_response)
        pending = [pending[i] for i in sorted(failed)]  # request order, whatever order they finished in
    return [results[p.passage_id] for p in passages]
