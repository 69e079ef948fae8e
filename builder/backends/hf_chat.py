"""Chat prompts with a Hugging Face tokenizer, where message content cannot inject special tokens.

`apply_chat_template(..., tokenize=True)` renders the prompt and tokenizes the whole string
with added tokens matched everywhere, so a passage containing `<|im_end|>` would end the turn
and `<|im_start|>system` would open a new one. As in llama_cpp.py, the template is rendered
with a private-use sentinel in place of each message's content and tokenized piece by piece:
the template's own text with special tokens allowed, each content with `split_special_tokens`
so every spelling of a special token stays plain text. Shared by the transformers and vLLM
backends (vLLM takes the token ids as they are).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


def _sentinel(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in a template, never survive tokenization


def _plain_bos(tokenizer) -> str:
    """BOS text for a prompt without a chat template, where the tokenizer would add one itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return ""
    return tokenizer.bos_token if tokenizer.encode("a", add_special_tokens=True)[:1] == [bos] else ""


def template(tokenizer, messages: Sequence[dict]) -> str:
    """The rendered prompt with each message's content replaced by a sentinel."""
    stand_ins = [{"role": m["role"], "content": _sentinel(i)} for i, m in enumerate(messages)]
    if not getattr(tokenizer, "chat_template", None):
        # Base models ship no chat template: the same plain prompt as llama_cpp.py renders.
        return _plain_bos(tokenizer) + "".join(
            f"{m['role'].capitalize()}:\n{m['content']}\n\n" for m in stand_ins) + "Assistant:\n"
    return tokenizer.apply_chat_template(stand_ins, tokenize=False, add_generation_prompt=True)


def render(tokenizer, messages: Sequence[dict]) -> str:
    """The prompt text the model sees (cache keys, debugging)."""
    return _SENTINEL.sub(lambda m: messages[int(m.group(1))]["content"], template(tokenizer, messages))


def special_ids(tokenizer) -> set[int]:
    """Ids of the special added tokens. `all_special_ids` lists only the named ones (bos, eos,
    pad, ...), not e.g. SmolLM2's `<file_sep>`; unk is left out: an unknown character may
    legitimately become it."""
    ids = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return ids - {tokenizer.unk_token_id}


def content_ids(tokenizer, text: str) -> list[int]:
    """Plain text to token ids: special-token spellings are split into ordinary tokens."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []


def prompt_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of the chat prompt, ending with the generation prompt."""
    ids: list[int] = []
    specials = special_ids(tokenizer)
    # split() alternates template text and captured sentinel indexes.
    for j, piece in enumerate(_SENTINEL.split(template(tokenizer, messages))):
        if j % 2 == 0:
            if piece:
                ids += tokenizer.encode(piece, add_special_tokens=False)
            continue
        content = content_ids(tokenizer, messages[int(piece)]["content"])
        # A tokenizer that ignores split_special_tokens would let content inject a turn:
        # refuse loudly instead of prompting the model with it.
        if specials.intersection(content):
            raise ValueError(f"{type(tokenizer).__name__} turned special-token spellings in message content into "
                             "special tokens (split_special_tokens is not supported)")
        ids += content
    return ids
