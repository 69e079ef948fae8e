"""A local Hugging Face checkpoint in-process, through transformers (e.g. a generation's trained
model, models/gen-0001, annotating the next generation).

Prompts are token ids from hf_chat: the chat template's text with special tokens, message
content without, so a passage cannot inject a turn. Output is constrained to the JSON Schema
by xgrammar, through its transformers LogitsProcessor. xgrammar rather than outlines or
lm-format-enforcer: it is the grammar engine vLLM uses by default, so the transformers and
vLLM backends constrain a schema the same way; its per-token masks are precomputed from the
vocabulary when a schema is compiled (fast on CPU), and it works with the CPU torch (the
Makefile installs it without triton, which only its CUDA kernels use).

Requests run one at a time with `torch.manual_seed(request.seed)` before each, so the same
request gives the same output whatever else was in the batch.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field

from ..models import check_checkpoint, weights_sha256
from . import hf_chat
from .base import Engine, EngineConfig, Request, Response, SequentialBackend, context_overflow
from .choices import Step, read_decision, top_k


class TransformersConfig(EngineConfig):
    backend: Literal["transformers"] = "transformers"
    n_ctx: int = Field(4096, ge=256, description="Context window in tokens.")
    threads: int = Field(0, ge=0, description="CPU threads of torch; 0 = torch's default.")
    dtype: str = Field("auto", description="Weights dtype: auto, float32, bfloat16, float16.")
    device: str = Field("auto", description="cpu, cuda, or auto (cuda when available).")


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"  # the checkpoint's own dtype
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype '{name}' (auto, float32, bfloat16, float16)")
    return dtype


class TransformersBackend(SequentialBackend):
    kind = "transformers"

    def __init__(self, model_dir: Path, n_ctx: int = 4096, dtype: str = "auto", device: str = "auto",
                 threads: int = 0):
        self.model_dir = check_checkpoint(model_dir)
        self.n_ctx = n_ctx
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._threads_before = torch.get_num_threads()
        if threads:
            # Process-wide (restored by close). torch's OpenMP threads spin at every op: next to
            # another busy process on 2 cores, 2 threads ran SmolLM2 up to 30x slower than 1.
            torch.set_num_threads(threads)

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch_dtype(dtype))
        self.model.to(self.device).eval()
        self.family = self.model.config.model_type
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.eos_ids = eos  # generate() stops on these; the grammar must allow them once the JSON is complete
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or [0])[0]
        self._model_id: str | None = None
        self._compiler = None
        self._grammars: dict = {}

    @classmethod
    def from_config(cls, cfg: TransformersConfig) -> "TransformersBackend":
        # A relative folder is taken as given: the caller resolves it against the workspace.
        return cls(Path(cfg.model), n_ctx=cfg.n_ctx, dtype=cfg.dtype, device=cfg.device, threads=cfg.threads)

    @property
    def model_id(self) -> str:
        if self._model_id is None:
            self._model_id = weights_sha256(self.model_dir)
        return self._model_id

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def describe(self) -> dict:
        # "file" + "sha256": the keys the dataset card reads for a model identified by its weights.
        return {"file": self.model_dir.name, "sha256": self.model_id, "backend": self.kind, "family": self.family,
                "decoding": "grammar (xgrammar)"}

    def render(self, messages: Sequence[dict]) -> str:
        return hf_chat.render(self.tokenizer, messages)

    def prompt_tokens(self, messages: Sequence[dict]) -> list[int]:
        return hf_chat.prompt_ids(self.tokenizer, messages)

    def count_tokens(self, text: str) -> int:
        return len(hf_chat.content_ids(self.tokenizer, text))

    def _grammar(self, schema: dict):
        import xgrammar as xgr

        if self._compiler is None:  # built on first use: walking the vocabulary takes a moment
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model.config.vocab_size,
                                                      stop_token_ids=self.eos_ids)
            self._compiler = xgr.GrammarCompiler(info)
        key = json.dumps(schema)  # not sorted: the grammar writes properties in the schema's order
        if key not in self._grammars:
            # Compact JSON: with any whitespace allowed a small model can emit newlines until max_tokens.
            self._grammars[key] = self._compiler.compile_json_schema(key, any_whitespace=False)
        return self._grammars[key]

    def _one(self, request: Request) -> Response:
        import torch

        start = time.perf_counter()
        tokens: list[int] = []
        try:
            tokens = self.prompt_tokens(request.messages)
            overflow = context_overflow(len(tokens), request, self.n_ctx)
            if overflow:
                return overflow
            kwargs: dict = {"max_new_tokens": request.max_tokens, "pad_token_id": self.pad_id,
                            "eos_token_id": self.eos_ids}
            if request.temperature > 0:
                kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
            else:  # greedy; the Nones keep a checkpoint's sampling defaults from warning "unused flag"
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            if request.repeat_penalty != 1.0:
                kwargs["repetition_penalty"] = request.repeat_penalty
            if request.schema is not None:
                from xgrammar.contrib.hf import LogitsProcessor

                # One processor per generate() call: it holds the matcher's state.
                kwargs["logits_processor"] = [LogitsProcessor(self._grammar(request.schema))]
            if request.decision:  # the raw logits of every step: the decision's distribution is read from them
                kwargs.update(output_logits=True, return_dict_in_generate=True)
            input_ids = torch.tensor([tokens], device=self.device)
            torch.manual_seed(request.seed)
            with torch.inference_mode():
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
            sequences = out.sequences if request.decision else out
            new = sequences[0, len(tokens):].tolist()
        except Exception as exc:  # one bad request must not stop the batch
            return Response("", "error", len(tokens), error=f"{type(exc).__name__}: {exc}",
                            seconds=time.perf_counter() - start)
        stopped = bool(new) and new[-1] in self.eos_ids
        if stopped:
            new = new[:-1]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        finish = "length" if not stopped and len(new) >= request.max_tokens else "stop"
        decision = None
        if request.decision:
            try:
                decision = self._decision(request, tokens, new, out.logits, text)
            except Exception:  # a distribution that cannot be read is not a failed answer
                decision = None
        return Response(text, finish, len(tokens), len(new), time.perf_counter() - start, decision=decision)

    def _text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _decision(self, request: Request, prompt: list[int], new: list[int], logits, text: str) -> dict | None:
        """The decision's distribution from the raw logits of the generated steps (the scores
        before the grammar's processor), probing one step further where a token begins several values."""
        import torch

        def probe(path: list[int]) -> dict[int, tuple[str, float]]:
            with torch.inference_mode():
                row = self.model(input_ids=torch.tensor([prompt + path], device=self.device)).logits[0, -1]
            return top_k(row.float().cpu().numpy(), self._text)

        steps = [Step(t, self._text(t), (lambda j=j: top_k(logits[j][0].float().cpu().numpy(), self._text)))
                 for j, t in enumerate(new)]
        return read_decision(request.decision, text, steps, probe)

    def close(self) -> None:
        if self.model is not None:
            import torch

            torch.set_num_threads(self._threads_before)
        self.model = None
        self._grammars.clear()


ENGINE = Engine("transformers", TransformersConfig, TransformersBackend.from_config, model_file="checkpoint",
                summary="a local transformers checkpoint in-process (e.g. a trained generation, models/gen-0001), "
                        "xgrammar-constrained",
                check_model=lambda spec: check_checkpoint(Path(spec)) and None,
                where=lambda cfg: f"{cfg.model} (transformers checkpoint)")
