"""What the prompt side of an engine needs from a GGUF file's header, read without llama.cpp.

The managed llama-server renders and tokenizes prompts here, before sending token ids: it needs
the model's architecture, chat template, BOS/EOS token texts and vocabulary size. The `gguf`
package's GGUFReader materialises every array of the header (Gemma 3's 262k-token vocabulary,
its scores and types: 8 s on 2 cores); this walks the key-value section once, skipping arrays
by their sizes, and reads only the two token texts it needs.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

# GGUF value types (ggml/include/gguf.h) and the struct format of the fixed-size ones.
_FIXED = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
    """Not a GGUF file, or a header this reader does not understand; the message names the file."""


@dataclass(frozen=True)
class GGUFFacts:
    family: str
    chat_template: str | None
    bos: str
    eos: str
    add_bos: bool
    n_vocab: int


# llama.cpp's special-token ids for a tokenizer model whose header names none (llama-vocab.cpp).
DEFAULT_BOS_EOS = {"llama": (1, 2), "gpt2": (11, 11), "bert": (101, -1), "t5": (-1, 1), "rwkv": (-1, -1),
                   "plamo2": (1, 2)}


def read_facts(path: Path) -> GGUFFacts:
    """The header facts of a GGUF file (little-endian, versions 2 and 3)."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _read(buf)
    except GGUFHeaderError as exc:
        raise GGUFHeaderError(f"{path}: {exc}") from None
    except (struct.error, IndexError, KeyError, ValueError) as exc:  # ValueError: mmap of an empty file
        raise GGUFHeaderError(f"{path}: cannot read its GGUF header ({type(exc).__name__}: {exc})") from None


def _read(buf) -> GGUFFacts:
    if buf[:4] != b"GGUF":
        raise GGUFHeaderError("not a GGUF file (no GGUF magic)")
    version, _tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        raise GGUFHeaderError(f"a big-endian GGUF file (version {swapped}): llama.cpp on this machine reads "
                              "little-endian ones" if swapped in (2, 3) else
                              f"GGUF version {version} (this reader knows 2 and 3)")
    pos, values, tokens_at = 24, {}, None
    for _ in range(n_kv):
        key, pos = _string(buf, pos)
        (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
        if kind == _ARRAY:
            (item, count), pos = struct.unpack_from("<IQ", buf, pos), pos + 12
            if key == "tokenizer.ggml.tokens":
                tokens_at, values[key] = pos, count
            pos = _skip_array(buf, pos, item, count)
        else:
            values[key], pos = _value(buf, pos, kind)
    default_bos, default_eos = DEFAULT_BOS_EOS.get(values.get("tokenizer.ggml.model", ""), (-1, -1))
    bos = values.get("tokenizer.ggml.bos_token_id", default_bos)
    eos = values.get("tokenizer.ggml.eos_token_id", default_eos)
    count = values.get("tokenizer.ggml.tokens", 0)
    wanted = {i for i in (bos, eos) if 0 <= i < count}  # an id outside the vocabulary names no token
    texts = _token_texts(buf, tokens_at, wanted) if tokens_at is not None and wanted else {}
    return GGUFFacts(family=values.get("general.architecture", "unknown"),
                     chat_template=values.get("tokenizer.chat_template"),
                     bos=texts.get(bos, ""), eos=texts.get(eos, ""),
                     add_bos=bool(values.get("tokenizer.ggml.add_bos_token", False)),
                     n_vocab=count)


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    if pos + 8 + n > len(buf):
        raise GGUFHeaderError(f"a string of {n} bytes at offset {pos} runs past the end of the file")
    # llama.cpp takes the bytes as they are: a stray invalid byte in some licence text is no reason to fail
    return bytes(buf[pos + 8:pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n


def _value(buf, pos: int, kind: int):
    if kind == _STRING:
        return _string(buf, pos)
    fmt = "<" + _FIXED[kind]
    return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)


def _skip_array(buf, pos: int, item: int, count: int) -> int:
    if item in _FIXED:
        return pos + count * struct.calcsize("<" + _FIXED[item])
    if item != _STRING:
        raise GGUFHeaderError(f"an array of type {item} (nested arrays are not read here)")
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
    return pos


def _token_texts(buf, pos: int, wanted: set[int]) -> dict[int, str]:
    """The texts of the wanted token ids (within the vocabulary), walking its array only as far as needed."""
    out, last = {}, max(wanted)
    for i in range(last + 1):
        text, pos = _string(buf, pos)
        if i in wanted:
            out[i] = text
    return out
