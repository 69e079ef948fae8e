"""Schema-valid outputs from any engine: validate, retry with another seed, or record why not.

Every model task (stages/base.py: run_task) goes through here.
Output is constrained to the request's JSON Schema where the engine can do it, and always
validated again: an invalid output is retried with the next seed (and a temperature high
enough to change the answer), a bounded number of times; after that the item gets a
rejection with its reason. Never a crash, never a silent drop.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import jsonschema

from .backends.base import Request, Response
from .prompts import unmark

RETRY_MIN_TEMPERATURE = 0.7  # a retry under greedy decoding would repeat the same output


@dataclass
class Outcome:
    status: str  # accepted | rejected
    record: dict | None = None
    reason: str | None = None  # why the last attempt failed
    attempts: int = 0
    truncated: int = 0  # attempts cut off by the token limit
    call_key: str | None = None  # the model call that produced the record


_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def validator_for(schema: dict) -> jsonschema.Draft202012Validator:
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        _VALIDATORS[key] = jsonschema.Draft202012Validator(schema)
    return _VALIDATORS[key]


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


def retry_sampling(temperature: float, attempt: int) -> float:
    return temperature if attempt == 0 else max(temperature, RETRY_MIN_TEMPERATURE)


def generate_valid(n: int, make_request: Callable[[int, int], Request], engine, retries: int,
                   on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run items 0..n-1 through `engine` (a cached backend) in rounds: round 0 for all, then only
    the failures again, up to `retries` extra rounds. make_request(i, attempt) builds item i's
    request; each output is validated against that request's schema. on_done(i, outcome) is
    called once per item, when it is accepted or out of attempts."""
    outcomes = [Outcome("rejected") for _ in range(n)]
    pending = list(range(n))
    for attempt in range(retries + 1):
        if not pending:
            break
        requests = [make_request(i, attempt) for i in pending]
        failed: list[int] = []

        def on_response(j: int, response: Response) -> None:
            i, out = pending[j], outcomes[pending[j]]
            out.attempts += 1
            out.truncated += response.finish_reason == "length"
            record, reason = check_output(response, validator_for(requests[j].schema))
            if record is not None:
                out.status, out.record, out.reason = "accepted", record, None
                out.call_key = response.extra.get("cache_key")
            else:
                out.reason = reason
                failed.append(i)
            if on_done and (record is not None or attempt == retries):
                on_done(i, out)

        engine.generate(requests, on_response)
        pending = sorted(failed)  # request order, whatever order they finished in
    return outcomes
