"""What every experiment shares: its error, training one arm from the base model (reused while
its identity holds); the paired bootstrap interval over items and training seeds is builder/stats.py: paired_interval."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..config import TrainConfig
from ..train import _replace, plain_text_for, torch_threads


class ExperimentError(Exception):
    """An experiment that cannot run as configured; the message names the file or key."""


def experiment_folder(ws, name: str) -> Path:
    """WS/experiments/NAME: every experiment's trained arms, caches, results.json and NAME.png."""
    return ws.root / "experiments" / name


def write_results(folder: Path, result: dict, plot) -> dict:
    """results.json and the plot (`plot(result)` -> a figure, saved as FOLDER.png) in `folder`; the
    result, with `output` naming the folder."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    fig = plot(result)
    fig.tight_layout()
    fig.savefig(folder / f"{folder.name}.png", dpi=120)
    plt.close(fig)
    return {**result, "output": str(folder)}


def subplots(*args, **kwargs):
    """matplotlib's subplots, drawn off-screen (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def error_bars(cis: list[dict]) -> list[list[float]]:
    """matplotlib's asymmetric error bars (below, above the mean) of bootstrap intervals."""
    return [[c["mean"] - c["low"] for c in cis], [c["high"] - c["mean"] for c in cis]]


def cached(folder: Path, kind: str, key: dict, compute):
    """compute(), stored under folder/kind/ by the hash of `key` and reused while it holds."""
    from ..cache import sha256

    path = folder / kind / f"{sha256(key)[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}) + "\n", encoding="utf-8")
    return value


def arm_settings(train: TrainConfig, c, seed: int | None = None) -> TrainConfig:
    """train.* with an experiment's budget (steps, learning_rate, batch_size, max_length; seed, else
    the first of c.seeds): every arm full-weight, no accumulation."""
    return train.model_copy(update={"sft_steps": c.steps, "sft_learning_rate": c.learning_rate,
                                    "batch_size": c.batch_size, "max_length": c.max_length,
                                    "seed": c.seeds[0] if seed is None else seed,
                                    "grad_accumulation": 1, "use_lora": False})


def train_arm(arm: str, trainer, out: Path, base_path: Path, data, cfg: TrainConfig, template: str, identity: dict,
              say) -> dict:
    """Train one arm from the base model with `trainer` (model, tokenizer, data, cfg, scratch,
    say) -> (model, summary), into `out`, unless a model with the same identity is there."""
    stored = out / "training.json"
    if stored.is_file():
        summary = json.loads(stored.read_text(encoding="utf-8"))
        if summary.get("identity") == identity:
            return {**summary, "unchanged": True}
        say(f"{out.name}: its data or settings changed; training it again")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    partial, scratch = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.runs")
    for folder in (partial, scratch):
        shutil.rmtree(folder, ignore_errors=True)
    try:
        with torch_threads(cfg.threads):
            torch.manual_seed(cfg.seed)
            model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
            say(f"{arm} (seed {cfg.seed}): {cfg.sft_steps} step(s) on {len(data)} example(s)")
            model, trained = trainer(model, tokenizer, data, cfg, scratch, say)
            model.save_pretrained(str(partial), safe_serialization=True)
            del model
        tokenizer.save_pretrained(str(partial))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    summary = {"arm": arm, "training": trained, "identity": identity}
    (partial / "training.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    _replace(partial, out)
    return summary


def turn_logprob(model, tokenizer, template: str, context: list[dict], role: str, text: str) -> tuple[float, int]:
    """Summed log-probability of `text` (and its end of turn) as the next turn, spoken by `role`,
    after the `context` messages rendered with the ChatML `template`; and its number of tokens.
    Message text is made plain first, as for training (plain_text_for)."""
    import torch

    plain = plain_text_for(tokenizer)
    prefix = tokenizer.apply_chat_template([{**m, "content": plain(m["content"])} for m in context],
                                           chat_template=template, tokenize=False) + f"<|im_start|>{role}\n"
    ids_prefix = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = ids_prefix + tokenizer(plain(text) + "<|im_end|>", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, len(ids_prefix) - 1:-1].float()
    targets = torch.tensor(ids[len(ids_prefix):], device=model.device)
    return float(torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()), len(targets)


def contrast_panel(ax, names: list[str], cis: list[dict], xlabel: str, title: str) -> None:
    """Paired differences with their intervals, one row each, against a line at 0."""
    ax.errorbar([c["mean"] for c in cis], range(len(names)), xerr=error_bars(cis), fmt="o", capsize=4, color="#3b6ea5")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
