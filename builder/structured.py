"""Schema-valid outputs from any engine: validate, retry with another seed, or record why not.

Every model task (stages/base.py: run_task) goes through here.
Output is constrained to the request's JSON Schema where the engine can do it, and always
validated again: an invalid output is retried with the next seed (and a temperature high
enough to change the answer), a bounded number of times; after that the item gets a
rejection with its reason. Never a crash, never a silent drop.
"""
from __future__ import annotations

import json
import re
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
    decision: dict | None = None  # a judgement's distribution over its values (Response.decision)
    trimmed: int = 0  # strings cut back to a whole sentence or word after reaching their maxLength
    graded: object = None  # stages.base.Graded, for a judging task's accepted outcome
    checked: object = None  # what the task's own check (ModelTask.check) found in the last valid answer


_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def validator_for(schema: dict) -> jsonschema.Draft202012Validator:
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        _VALIDATORS[key] = jsonschema.Draft202012Validator(schema)
    return _VALIDATORS[key]


def unfinished(response: Response) -> str | None:
    """Why an answer cannot be used whatever it says (an engine error, a cut-off), or None."""
    if response.finish_reason == "error":
        return f"engine error: {response.error}"
    if response.finish_reason == "length":
        return f"truncated: output hit the token limit after {response.completion_tokens} tokens"
    return None


def check_output(response: Response, validator: jsonschema.Draft202012Validator,
                 at_bound: str = "retry") -> tuple[dict | None, str | None]:
    """(record, None) for a valid output, (None, reason) otherwise. A string that reached its
    schema's maxLength was cut there by the grammar, mid-word: with at_bound = "retry" the output
    is truncated (retried, then rejected); with "trim" every such string is cut back to its last
    complete sentence (or word) and the record kept, with a `_trimmed` count (popped by the caller)."""
    if unfinished(response):
        return None, unfinished(response)
    try:
        record = unmark(json.loads(response.text))  # a copied data mark is no part of the answer
    except json.JSONDecodeError as exc:
        return None, f"invalid JSON: {exc.msg} at char {exc.pos}"
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return None, f"schema violation at {where}: {error.message[:200]}"
    cut = first_at_bound(record, validator.schema)
    if cut and at_bound == "retry":  # the grammar stops a string at maxLength, mid-word: a cut-off answer
        return None, f"truncated: {cut} reached its maxLength and was cut off"
    if cut:
        record, trimmed = trim_at_bound(record, validator.schema)
        return {**record, "_trimmed": trimmed}, None
    return record, None


def check_text(response: Response, validator: jsonschema.Draft202012Validator,
               field: str) -> tuple[dict | None, str | None]:
    """A free-text answer (no grammar, the model's own end of turn) as the record {field: text},
    validated against the task's schema: for answers that hold code, which a small model cannot
    be trusted to escape inside a JSON string (it ends the string at the code's first quote)."""
    if unfinished(response):
        return None, unfinished(response)
    record = {field: response.text.strip()}
    error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    if error is not None:
        return None, f"schema violation at {field}: {error.message[:200]}"
    return record, None


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_CLAUSE = re.compile(r"[;,:](?=\s)")


def trim(text: str, min_length: int = 0) -> str:
    """Cut a string that the grammar stopped mid-word back to its last complete sentence, or its
    last whole word (without a dangling comma), never below min_length."""
    half = max(min_length, len(text) // 2)
    ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() >= half]
    if ends:
        return text[:ends[-1]]
    clauses = [m.start() for m in _CLAUSE.finditer(text) if m.start() >= half]
    if clauses:
        return text[:clauses[-1]]
    words = text[:text.rfind(" ")] if " " in text else text
    words = words.rstrip(" ,;:-(\"'")
    return words if len(words) >= min_length else text


def trim_at_bound(value, schema: dict) -> tuple:
    """(value with every string at its maxLength trimmed, how many were)."""
    if isinstance(value, str):
        bound = schema.get("maxLength")
        if bound is not None and len(value) >= bound:
            return trim(value, schema.get("minLength", 0)), 1
        return value, 0
    if isinstance(value, dict):
        props, out, n = schema.get("properties", {}), {}, 0
        for k, v in value.items():
            out[k], m = trim_at_bound(v, props[k]) if k in props else (v, 0)
            n += m
        return out, n
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        pairs = [trim_at_bound(v, schema["items"]) for v in value]
        return [v for v, _ in pairs], sum(m for _, m in pairs)
    return value, 0


def first_at_bound(value, schema: dict, path: str = "") -> str | None:
    """The path of the first string that is exactly at its schema's maxLength, or None."""
    if isinstance(value, str):
        bound = schema.get("maxLength")
        return (path or "(root)") if bound is not None and len(value) >= bound else None
    if isinstance(value, dict):
        props = schema.get("properties", {})
        return next((found for k, v in value.items() if k in props
                     and (found := first_at_bound(v, props[k], f"{path}/{k}" if path else k))), None)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return next((found for i, v in enumerate(value)
                     if (found := first_at_bound(v, schema["items"], f"{path}/{i}"))), None)
    return None


def retry_sampling(temperature: float, attempt: int) -> float:
    return temperature if attempt == 0 else max(temperature, RETRY_MIN_TEMPERATURE)


def generate_valid(n: int, make_request: Callable[[int, int], Request], engine, retries: int,
                   on_done: Callable[[int, Outcome], None] | None = None, at_bound: str = "retry",
                   text_field: str = "", schema_of: Callable[[int], dict] | None = None,
                   check: Callable[[int, dict], tuple[dict, object, str | None]] | None = None) -> list[Outcome]:
    """Run items 0..n-1 through `engine` (a cached backend) in rounds: round 0 for all, then only
    the failures again, up to `retries` extra rounds. make_request(i, attempt) builds item i's
    request; each output is validated against that request's schema (with `text_field`: the
    request has none, and the free text becomes {text_field: text}, validated against
    schema_of(i)). `check(i, record)` -> (record, findings, veto) runs on every valid output: a
    veto fails the attempt like an invalid output (retried with the next seed, then the item is
    rejected with it), the findings are kept on the outcome. on_done(i, outcome) is called once
    per item, when it is accepted or out of attempts."""
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
            record, reason = (check_text(response, validator_for(schema_of(i)), text_field) if text_field else
                              check_output(response, validator_for(requests[j].schema), at_bound))
            out.truncated += response.finish_reason == "length" or (reason or "").startswith("truncated")
            if record is not None:
                out.trimmed = record.pop("_trimmed", 0)
            if record is not None and check is not None:
                record, out.checked, reason = check(i, record)
                record = None if reason else record
            if record is not None:
                out.status, out.record, out.reason = "accepted", record, None
                out.call_key = response.extra.get("cache_key")
                out.decision = response.decision
            else:
                out.reason = reason
                failed.append(i)
            if on_done and (record is not None or attempt == retries):
                on_done(i, out)

        engine.generate(requests, on_response)
        pending = sorted(failed)  # request order, whatever order they finished in
    return outcomes
