"""llama.cpp in-process, through llama-cpp-python.

Prompts are rendered with the model's own chat template, but tokenized piece by piece: the
template's text with special tokens allowed, every message's content with special tokens
*disallowed*. llama-cpp-python's `create_chat_completion` tokenizes the whole rendered
prompt with special=True, so a passage containing `<|im_end|>` would end the turn and open
a new role; here it stays plain text. Output is constrained by a grammar compiled from the
JSON Schema (what `response_format` does), and the shared instructions come first in every
prompt, so llama.cpp reuses their evaluated prefix from one call to the next.
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from ..models import file_sha256, resolve_model
from .gguf_header import GGUFFacts, read_facts
from .base import Engine, EngineConfig, EngineError, Request, Response, SequentialBackend, context_overflow, usable_cores
from .choices import Step, read_decision, top_k

if TYPE_CHECKING:  # llama_cpp loads its shared library on import: only engines that run load it
    from llama_cpp import Llama, LlamaGrammar

_SENTINEL = re.compile("\ue000(\\d+)\ue001")
GRAMMAR_MAX_VOCAB = 131_072


class GGUFKeys(EngineConfig):
    """The keys of every engine that runs a GGUF file with llama.cpp."""
    n_ctx: int = Field(4096, ge=256, description="Context window in tokens (llama_server: per slot).")
    threads: int = Field(0, ge=0, description="CPU threads; 0 = every core this process may use.")
    constrained: Literal["auto", "grammar", "validate"] = Field(
        "auto", description="grammar = constrain decoding to the JSON Schema; validate = decode freely, validate and "
        "retry; auto = grammar, except in-process for a huge vocabulary (Gemma's 262k tokens: ~2.5 s/token in "
        "llama-cpp-python; the managed server applies the grammar at no extra cost).")


class LlamaCppConfig(GGUFKeys):
    backend: Literal["llama_cpp"] = "llama_cpp"


INPROCESS_MISSING = ("llama.cpp in-process needs llama-cpp-python, the optional extra .[inprocess] (it compiles "
                     "llama.cpp, ~5 minutes on 2 cores): pip install -e '.[inprocess]'; the default engine, the managed "
                     "llama-server (.[server]), does not need it")


def load_llama_cpp():
    """llama-cpp-python, or an EngineError that says how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise EngineError(INPROCESS_MISSING) from None
    except OSError as exc:  # installed, but its shared library does not load
        raise EngineError(f"llama-cpp-python is installed but its library does not load ({exc}); reinstall "
                          "it: pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36") from None
    return llama_cpp


def where_gguf(cfg: EngineConfig) -> str:
    """Where a GGUF engine's model file is (`ratchet status`), or why it is not."""
    from ..models import ModelNotFound

    try:
        return str(resolve_model(cfg.model))
    except ModelNotFound as exc:
        return f"[red]{exc}[/]"


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in a template, never survive tokenization


class LlamaPrompting:
    """Chat template rendering, tokenization and stop strings of one GGUF model:
    what the in-process engine and the managed llama-server share, so that both send the
    very same prompt tokens (and share cache keys). An engine gives the header's facts
    (`GGUFFacts`) and its tokenizer (`_tokenize`)."""

    model_path: Path

    def _tokenize(self, text: str, special: bool) -> list[int]:
        raise NotImplementedError

    def _setup_prompting(self, constrained: str, facts: GGUFFacts) -> None:
        self.family = facts.family
        self.bos, self.eos = facts.bos, facts.eos
        # Base models (Gemma 3 270M here) ship no chat template: render a plain prompt instead,
        # starting with BOS where the model's metadata asks for one.
        self.plain_bos = self.bos if facts.add_bos else ""
        self.chat_template = facts.chat_template
        self._templates: dict[tuple[str, ...], str] = {}  # by the messages' roles
        # llama-cpp-python checks the grammar against every candidate token at every step: over
        # Gemma 3's 262k-token vocabulary that took ~2.5 s/token on 2 cores. "auto" decodes such
        # models freely and leaves it to validation and retries (the few-shot turns show the format).
        if constrained == "auto":
            constrained = "validate" if facts.n_vocab > GRAMMAR_MAX_VOCAB else "grammar"
        self.use_grammar = constrained == "grammar"

    @property
    def model_id(self) -> str:
        # Free decoding answers differently from grammar decoding: never share cache entries.
        return file_sha256(self.model_path) + ("" if self.use_grammar else ":free")

    @property
    def model_name(self) -> str:
        return self.model_path.name

    def describe(self) -> dict:
        return {"file": self.model_path.name, "sha256": file_sha256(self.model_path), "backend": self.kind,
                "family": self.family, "decoding": "grammar" if self.use_grammar else "free, validated"}

    def _template(self, messages: Sequence[dict]) -> str:
        """The rendered prompt with each message's content replaced by a sentinel. It depends on
        the roles alone, so it is rendered once per sequence of roles (every request renders it
        twice: its cache key and its tokens)."""
        roles = tuple(m["role"] for m in messages)
        if roles not in self._templates:
            self._templates[roles] = self._render_template(roles)
        return self._templates[roles]

    def _render_template(self, roles: tuple[str, ...]) -> str:
        stand_ins = [{"role": role, "content": _sentinel(i)} for i, role in enumerate(roles)]
        if self.chat_template is None:
            return self.plain_bos + "".join(f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in stand_ins) + "Assistant:\n"
        # transformers' renderer: the sandbox, extensions and variables llama-cpp-python's
        # Jinja2ChatFormatter mirrors (rendering must not change: it is part of every cache key)
        from transformers.utils.chat_template_utils import render_jinja_template

        (rendered,), _ = render_jinja_template([stand_ins], chat_template=self.chat_template, add_generation_prompt=True,
                                               bos_token=self.bos, eos_token=self.eos)
        return rendered

    def render(self, messages: Sequence[dict]) -> str:
        return _SENTINEL.sub(lambda m: messages[int(m.group(1))]["content"], self._template(messages))

    def prompt_tokens(self, messages: Sequence[dict]) -> list[int]:
        tokens: list[int] = []
        pieces = _SENTINEL.split(self._template(messages))
        # split() alternates template text and captured sentinel indexes.
        for j, piece in enumerate(pieces):
            if j % 2 == 0:
                if piece:
                    tokens += self._tokenize(piece, special=True)
            else:
                content = messages[int(piece)]["content"]
                if content:
                    tokens += self._tokenize(content, special=False)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text, special=False))

    def _stop(self, request: Request) -> list[str]:
        """A chat template ends the turn with EOS; a plain prompt needs stop strings. The few-shot
        answers there are one line of JSON, so a free-decoded JSON answer ends at the newline."""
        if self.chat_template is not None:
            return []
        if request.schema is not None and not self.use_grammar:
            return ["\n"]
        return ["\n\nUser:", "\n\nSystem:", "\n\nAssistant:"]


class LlamaCppBackend(LlamaPrompting, SequentialBackend):
    kind = "llama_cpp"

    def __init__(self, model_path: Path, n_ctx: int = 4096, threads: int = 0, constrained: str = "auto"):
        self.model_path = Path(model_path)
        self.n_ctx = n_ctx
        # Why this engine runs when another was asked for (no llama-server binary, ...): see make_backend.
        self.engine_note: str | None = None
        Llama = load_llama_cpp().Llama

        # llama-cpp-python's default is half the cores; 0 here means all of them.
        self.llm = Llama(model_path=str(self.model_path), n_ctx=n_ctx, n_threads=threads or usable_cores(),
                         n_batch=512, verbose=False)
        self._setup_prompting(constrained, read_facts(self.model_path))
        self._grammars: dict[str, LlamaGrammar] = {}

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def _grammar(self, schema: dict | None) -> LlamaGrammar | None:
        if schema is None or not self.use_grammar:
            return None
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema)  # not sorted: the grammar writes properties in the schema's order
        if key not in self._grammars:
            self._grammars[key] = LlamaGrammar.from_json_schema(key, verbose=False)
        return self._grammars[key]

    @classmethod
    def from_config(cls, cfg: GGUFKeys, note: str | None = None) -> "LlamaCppBackend":
        backend = cls(resolve_model(cfg.model), n_ctx=cfg.n_ctx, threads=cfg.threads, constrained=cfg.constrained)
        backend.engine_note = note
        return backend

    def describe(self) -> dict:
        out = super().describe()
        if self.engine_note:
            out["engine_note"] = self.engine_note
        return out

    def _one(self, request: Request) -> Response:
        start = time.perf_counter()
        try:
            tokens = self.prompt_tokens(request.messages)
            overflow = context_overflow(len(tokens), request, self.n_ctx)
            if overflow:
                return overflow
            # llama-cpp-python keeps the last prompt evaluated and re-evaluates only past the common
            # prefix (at least the last token, whose logits it needs).
            reused = min(type(self.llm).longest_token_prefix(self.llm.input_ids[:self.llm.n_tokens].tolist(), tokens),
                         len(tokens) - 1)
            out = self.llm.create_completion(
                prompt=tokens, max_tokens=request.max_tokens, temperature=request.temperature,
                top_p=request.top_p, repeat_penalty=request.repeat_penalty, seed=request.seed,
                grammar=self._grammar(request.schema), stop=self._stop(request))
        except Exception as exc:  # one bad request must not stop the batch
            return Response("", "error", error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start)
        choice, usage = out["choices"][0], out.get("usage", {})
        decision = None
        if request.decision:
            try:
                decision = self._decision(request, tokens, choice["text"])
            except Exception:  # a distribution that cannot be read is not a failed answer
                decision = None
        return Response(choice["text"], choice.get("finish_reason") or "stop", usage.get("prompt_tokens", len(tokens)),
                        usage.get("completion_tokens", 0), time.perf_counter() - start, decision=decision,
                        cached_tokens=max(reused, 0))

    def _text(self, token: int) -> str:
        return self.llm.detokenize([token]).decode("utf-8", errors="replace")

    def _next(self, ids: list[int]) -> dict[int, tuple[str, float]]:
        """The raw next-token top-K after `ids` (the KV cache keeps the shared prefix)."""
        import numpy as np

        llm = self.llm
        keep = 0
        for a, b in zip(llm._input_ids[:llm.n_tokens], ids[:-1]):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep = min(keep, len(ids) - 1)  # at least one token to evaluate: its logits are the answer
        llm.eval(ids[keep:])
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        return top_k(logits, self._text)

    def _decision(self, request: Request, prompt: list[int], text: str) -> dict | None:
        """Read the decision's distribution after the answer: the generated ids are the evaluated
        tokens after the prompt; a position's top-K is computed only if the decision needs it."""
        generated = [int(t) for t in self.llm._input_ids[len(prompt):self.llm.n_tokens]]
        ids = prompt + generated
        steps = [Step(t, self._text(t), (lambda j=j: self._next(ids[:len(prompt) + j])))
                 for j, t in enumerate(generated)]
        return read_decision(request.decision, text, steps, probe=lambda path: self._next(prompt + path))

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


ENGINE = Engine("llama_cpp", LlamaCppConfig, LlamaCppBackend.from_config, model_file="gguf",
                summary="llama.cpp in-process through llama-cpp-python (the fallback; bit-exact with itself)",
                check_model=resolve_model, explain=lambda cfg: "llama.cpp in-process (backend = llama_cpp)",
                where=lambda cfg: f"{where_gguf(cfg)} (llama.cpp in-process)")
