"""A scripted engine: answers without a model, for dry runs and for tests of orchestration.

`backend = "scripted"` answers every request from, in order:

1. a JSONL file (`answers`) of lines `{"prompt_sha256": ..., "text": ...}` (optionally
   `"finish_reason"`, and `"seed"` to answer only the attempt with that seed: a retry is
   reseeded): the answer to the prompt whose rendered text has that sha256;
2. a line of the same file `{"schema": "critique.schema.json", "text": ...}`: a fixed answer to
   every request constrained by that schema (its `$id`, or its `title`);
3. otherwise (`on_missing = "generate"`) a valid instance of the request's JSON Schema, made
   deterministically from the prompt: enum values and list lengths are picked by a hash of
   the prompt and the seed, strings are words of the request's last message. With
   `on_missing = "error"` such a request gets an error response instead.

It is never the default, and a build that used it says so in its summary and manifest
(`scripted_engine`): nothing it writes is a model's judgement. `model` is only a name here;
the family it poses as is `scripted-NAME` unless `family` is set, so two scripted members
named after two models are two families, as the real ones would be.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from .base import Backend, Engine, EngineConfig, EngineError, OnResponse, Request, Response

_MARKS = re.compile(r"^\| ", re.MULTILINE)
_WORDS = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")


class ScriptedConfig(EngineConfig):
    backend: Literal["scripted"] = "scripted"
    answers: str = Field("", description="A JSONL file of answers keyed by prompt_sha256 (or by schema); "
                         "empty: every answer is generated from the request's schema.")
    on_missing: Literal["generate", "error"] = Field(
        "generate", description="A prompt without a scripted answer gets a generated schema-valid answer "
        "(generate) or an error response (error).")
    family: str = Field("", description="The model family it poses as; empty: scripted-MODEL.")
    delay_s: float = Field(0.0, ge=0.0, le=60.0, description="Seconds to wait before each answer: stands in for a "
                           "slow model (e.g. to try stopping a build halfway).")


class ScriptedError(EngineError):
    """An answers file that cannot be used; the message names the file and line."""


def short_name(spec: str) -> str:
    return spec.removeprefix("bundled:") if spec.startswith("bundled:") else Path(spec).name.removesuffix(".gguf")


def load_answers(path: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """(answers by prompt sha256 or "sha256:seed", fixed answers by schema) from a JSONL file."""
    by_prompt, by_schema = {}, {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptedError(f"{path}: answers file not found") from None
    except UnicodeDecodeError as exc:
        raise ScriptedError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ScriptedError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ScriptedError(f"{path}:{lineno}: each line needs a string 'text'")
        if "prompt_sha256" in row:
            key = str(row["prompt_sha256"]) + (f":{row['seed']}" if "seed" in row else "")
            by_prompt[key] = row
        elif "schema" in row:
            by_schema[str(row["schema"])] = row
        else:
            raise ScriptedError(f"{path}:{lineno}: each line needs 'prompt_sha256' or 'schema'")
    return by_prompt, by_schema


class _Picker:
    """Deterministic choices from a hash of (prompt, seed)."""

    def __init__(self, key: str):
        self.key, self.n = key, 0

    def __call__(self, options: int) -> int:
        self.n += 1
        digest = hashlib.sha256(f"{self.key}\x1f{self.n}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % max(1, options)


def _words(text: str) -> list[str]:
    return _WORDS.findall(_MARKS.sub("", text)) or ["scripted"]


def instance(schema: dict, words: list[str], pick: _Picker):
    """A value valid under `schema` (the subset of JSON Schema this project's schemas use)."""
    if "enum" in schema:
        return schema["enum"][pick(len(schema["enum"]))]
    kind = schema.get("type")
    if kind == "object":
        return {name: instance(sub, words, pick) for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        low = schema.get("minItems", 0)
        high = min(schema.get("maxItems", low + 2), low + 2)
        return [instance(schema.get("items", {}), words, pick) for _ in range(low + pick(high - low + 1))]
    if kind == "string":
        low, high = schema.get("minLength", 0), schema.get("maxLength", 80) - 1  # under the bound: not cut off
        start = pick(len(words))
        text = ""
        for word in (words[start:] + words[:start])[:8]:
            if len(text) + len(word) + 1 > high:
                break
            text = f"{text} {word}".strip()
        while len(text) < low:
            text += " scripted"
        return text[:high]
    if kind in ("integer", "number"):
        return schema.get("minimum", 0)
    if kind == "boolean":
        return bool(pick(2))
    return None


class ScriptedBackend(Backend):
    kind = "scripted"
    is_model = False

    def __init__(self, model: str = "scripted", answers: str | Path = "", on_missing: str = "generate",
                 family: str = "", delay_s: float = 0.0):
        self.model, self.delay_s = model, delay_s
        self.answers_path = Path(answers) if answers else None
        self.by_prompt, self.by_schema = load_answers(self.answers_path) if self.answers_path else ({}, {})
        self.on_missing = on_missing
        self.family = family or f"scripted-{short_name(model)}"
        source = hashlib.sha256(self.answers_path.read_bytes()).hexdigest()[:12] if self.answers_path else "schema"
        self._model_id = f"scripted:{model}:{source}"
        self.calls = 0

    @classmethod
    def from_config(cls, cfg: ScriptedConfig) -> "ScriptedBackend":
        return cls(cfg.model, cfg.answers, cfg.on_missing, cfg.family, cfg.delay_s)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def model_name(self) -> str:
        return short_name(self.model)

    def describe(self) -> dict:
        return {"model": self.model, "backend": self.kind, "family": self.family,
                "answers": self.answers_path.name if self.answers_path else "generated from each schema"}

    def render(self, messages: Sequence[dict]) -> str:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def answer(self, request: Request) -> Response:
        prompt = self.render(request.messages)
        sha = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
        row = self.by_prompt.get(f"{sha}:{request.seed}") or self.by_prompt.get(sha)
        if row is None and request.schema is not None:
            row = self.by_schema.get(request.schema.get("$id", "")) or self.by_schema.get(request.schema.get("title", ""))
        if row is not None:
            text, finish = row["text"], row.get("finish_reason", "stop")
        elif self.on_missing == "generate":
            pick = _Picker(f"{prompt}\x1f{request.seed}")
            words = _words(request.messages[-1]["content"]) if request.messages else ["scripted"]
            value = instance(request.schema, words, pick) if request.schema else " ".join(words[:12])
            text, finish = (json.dumps(value, ensure_ascii=False) if request.schema else value), "stop"
        else:
            return Response("", "error", error=f"scripted engine {self.model}: no answer for this prompt "
                                                "(on_missing = error)")
        return Response(text, finish, len(prompt.split()), len(text.split()), 0.0,
                        decision=self._decision(request, text, prompt))

    @staticmethod
    def _decision(request: Request, text: str, prompt: str) -> dict | None:
        """A made-up distribution whose most likely value is the one in the answer, so that the
        graded path of every judging stage runs without a model (method "scripted")."""
        if not request.decision:
            return None
        field, choices = request.decision
        try:
            chosen = json.loads(text).get(field)
        except (json.JSONDecodeError, AttributeError):
            return None
        if chosen not in choices:
            return None
        top = 0.4 + 0.5 * _Picker(f"{prompt}\x1f{request.seed}\x1fdecision")(1000) / 1000
        rest = (1.0 - top) / max(1, len(choices) - 1)
        probs = {c: (top if c == chosen else rest) for c in choices}
        return {"field": field, "logprobs": {c: math.log(p) if p > 0 else -math.inf for c, p in probs.items()},
                "method": "scripted"}

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        out = []
        for i, request in enumerate(requests):
            self.calls += 1
            if self.delay_s:
                time.sleep(self.delay_s)
            out.append(self.answer(request))
            if on_response:
                on_response(i, out[-1])
        return out


ENGINE = Engine("scripted", ScriptedConfig, ScriptedBackend.from_config, model_file="name",
                summary="answers from a JSONL file or generated from each schema, without a model: dry runs and "
                        "tests of orchestration (never the default)")
