"""Any server that speaks the OpenAI chat API: vLLM serve, SGLang, llama.cpp's server,
llama-cpp-python's server, hosted APIs.

Requests of a batch run concurrently (bounded), each with a timeout and retries with
exponential backoff on connection errors, timeouts and 5xx answers. A server that is down,
or answers something that is not an OpenAI chat completion, gives a response with
finish_reason "error" and a reason that names the server: never an exception mid-batch.

The server renders the chat template and tokenizes it itself, and the servers we know
(llama.cpp's and llama-cpp-python's among them) tokenize the rendered prompt with special
tokens enabled. So spellings of special tokens in message content are broken up with a zero
width space before they are sent: `<|im_end|>` in a passage reaches the model as the
visible characters, never as the token.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from typing import Literal

import httpx
from pydantic import Field, model_validator

from ..corpus import approx_tokens
from .base import Backend, Engine, EngineConfig, OnResponse, Request, Response, as_answered, request_pool
from .choices import TOP_K, Step, read_decision
from .retry import Retryable, check_status, with_retries

ZWSP = "\u200b"
# ChatML / Llama 3 style <|...|>, Gemma's turn markers, SentencePiece <s> </s>, [INST].
_SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|</?(?:start_of_turn|end_of_turn|bos|eos|s|pad|unk)>|\[/?INST\]")


def neutralize_special_tokens(text: str) -> str:
    """Insert a zero-width space after the first character of every special-token spelling."""
    return _SPECIAL.sub(lambda m: m.group(0)[0] + ZWSP + m.group(0)[1:], text)


class OpenAIConfig(EngineConfig):
    backend: Literal["openai"] = "openai"
    base_url: str = Field("", description="The server, e.g. http://127.0.0.1:8000 (without /v1).")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the API key, if any.")
    concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds to wait for one answer.")
    max_retries: int = Field(3, ge=0, le=20, description="Retries (with backoff) on connection errors, timeouts, "
                             "5xx, garbage.")
    response_format: Literal["json_schema", "json_object"] = Field(
        "json_schema", description="json_schema (OpenAI, vLLM, SGLang, llama-server) or json_object "
        "(llama-cpp-python's server).")
    logprobs: bool = Field(True, description="Ask for top_logprobs with a judgement (its distribution is read from "
                           "them); a server that refuses them is asked again without, and judgements fall back to "
                           "samples (judgements.samples).")

    @model_validator(mode="after")
    def _needs_a_url(self):
        if not self.base_url:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000)")
        return self


class ServerError(Exception):
    pass


def decision_from_logprobs(request: Request, text: str, logprobs: dict | None) -> dict | None:
    """The decision's distribution from an OpenAI `logprobs.content` list (token strings, no
    ids: a token that begins several values is split evenly unless it is on the generated path;
    a chat server cannot be asked to continue a given prefix)."""
    if not request.decision or not logprobs or not logprobs.get("content"):
        return None
    ids: dict[str, int] = {}
    steps = []
    for entry in logprobs["content"]:
        top = {ids.setdefault(t["token"], len(ids)): (t["token"], t["logprob"]) for t in entry.get("top_logprobs") or []}
        token = ids.setdefault(entry["token"], len(ids))
        top.setdefault(token, (entry["token"], entry["logprob"]))
        steps.append(Step(token, entry["token"], top))
    return read_decision(request.decision, text, steps)


class OpenAIBackend(Backend):
    kind = "openai"
    served = True

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout_s: float = 120.0, max_retries: int = 3, backoff_s: float = 0.5,
                 response_format: str = "json_schema", model_id: str | None = None, logprobs: bool = True):
        self.logprobs = logprobs
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.response_format = response_format
        self._model_id = model_id or f"openai:{self.base_url}:{model}"
        key = os.environ.get(api_key_env, "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.base_url, timeout=timeout_s, headers=headers)

    @classmethod
    def from_config(cls, cfg: OpenAIConfig) -> "OpenAIBackend":
        return cls(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
                   timeout_s=cfg.timeout_s, max_retries=cfg.max_retries, response_format=cfg.response_format,
                   logprobs=cfg.logprobs)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def model_name(self) -> str:
        return self.model

    def describe(self) -> dict:
        return {"server": self.base_url, "model": self.model, "backend": self.kind}

    def reported_model(self) -> str | None:
        """The model id the server reports for `model` (GET /v1/models), or None when it does not say."""
        try:
            r = self.client.get("/v1/models")
            r.raise_for_status()
            ids = [m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)]
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return self.model if self.model in ids else (",".join(sorted(i for i in ids if i)) or None)

    def render(self, messages: Sequence[dict]) -> str:
        # The server owns the chat template: the messages as sent are what identifies a prompt.
        return json.dumps(self._messages(messages), ensure_ascii=False)

    def count_tokens(self, text: str) -> int:
        return approx_tokens(text)  # servers do not share one tokenize endpoint; an estimate serves chunking

    @staticmethod
    def _messages(messages: Sequence[dict]) -> list[dict]:
        return [{"role": m["role"], "content": neutralize_special_tokens(m["content"])} for m in messages]

    def payload(self, request: Request) -> dict:
        body = {"model": self.model, "messages": self._messages(request.messages), "max_tokens": request.max_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "seed": request.seed}
        if request.repeat_penalty != 1.0:
            body["repeat_penalty"] = request.repeat_penalty  # llama.cpp and vLLM read it; others ignore it
        if request.schema is not None:
            if self.response_format == "json_object":  # llama-cpp-python's server
                body["response_format"] = {"type": "json_object", "schema": request.schema}
            else:  # OpenAI, vLLM, SGLang, llama.cpp's llama-server
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": request.schema.get("title", "output")[:64].replace(" ", "_"),
                                                           "schema": request.schema}}
        if request.decision and self.logprobs:
            body.update(logprobs=True, top_logprobs=TOP_K)
        return body

    def _post(self, body: dict) -> dict:
        """One request with retries; raises ServerError with a reason that names the server."""
        return with_retries(lambda: self._post_once(body), self.max_retries, self.backoff_s, ServerError)

    def _post_once(self, body: dict) -> dict:
        try:
            answer = self.client.post("/v1/chat/completions", json=body)
        except httpx.ConnectError:
            raise Retryable(f"cannot connect to {self.base_url} (is the server running?)") from None
        except httpx.TimeoutException:
            raise Retryable(f"{self.base_url} did not answer within {self.client.timeout.read}s") from None
        except httpx.HTTPError as exc:
            raise Retryable(f"{self.base_url}: {type(exc).__name__}: {exc}") from None
        check_status(answer, self.base_url, ServerError)
        try:
            data = answer.json()
            data["choices"][0]["message"]
            return data
        except (ValueError, KeyError, IndexError, TypeError):
            raise Retryable(f"{self.base_url} answered something that is not a chat completion: "
                            f"{answer.text[:200]!r}") from None

    def _one(self, request: Request) -> Response:
        start = time.perf_counter()
        body = self.payload(request)
        try:
            try:
                data = self._post(body)
            except ServerError:
                if "logprobs" not in body:
                    raise
                self.logprobs = False  # a server that refuses logprobs: ask without them from now on
                data = self._post(self.payload(request))
        except ServerError as exc:
            return Response("", "error", error=str(exc), seconds=time.perf_counter() - start)
        choice, usage = data["choices"][0], data.get("usage") or {}
        text = choice["message"].get("content") or ""
        return Response(text, choice.get("finish_reason") or "stop", usage.get("prompt_tokens", 0),
                        usage.get("completion_tokens", 0), time.perf_counter() - start,
                        decision=decision_from_logprobs(request, text, choice.get("logprobs")),
                        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"))

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        responses: list[Response | None] = [None] * len(requests)
        with request_pool(self.concurrency) as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for future in as_answered(futures):  # callbacks run here, in the caller's thread
                i = futures[future]
                responses[i] = future.result()
                if on_response:
                    on_response(i, responses[i])
        return responses  # type: ignore[return-value]

    def close(self) -> None:
        self.client.close()


ENGINE = Engine("openai", OpenAIConfig, OpenAIBackend.from_config, model_file="name",
                summary="any OpenAI-compatible server (vLLM serve, SGLang, llama.cpp's server, hosted APIs)",
                where=lambda cfg: f"{cfg.model} at {cfg.base_url} (OpenAI-compatible server)")
