"""`ratchet train`: the bundled TRL trainer. Generation N's dataset trains the model that
annotates generation N+1.

SFT on the generation's `sft` split (messages with `text` and `internal` turns) with the
project's chat template (prompts/chat_template.jinja), whose `{% generation %}` markers make
TRL's `assistant_only_loss` put the loss on the reflections alone; then DPO on the `dpo` split
(TRL's conversational preference format) when the generation has one. Generation 1 starts from
`train.base_model` (the bundled SmolLM2 GGUF, dequantized once into WS/models/base/);
generation N starts from models/gen-(N-1) when it exists. The result, models/gen-NNNN/
(safetensors, the tokenizer with the project's template, a model card, training.json), is
written under a temporary name and renamed into place, and loads with the `transformers`
backend as an ensemble member.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .backends import registry
from .cache import sha256
from .config import RatchetConfig, TrainConfig
from .models import ModelNotFound, check_checkpoint, exported, file_sha256, resolve_model, weights_sha256
from .resources import PROMPTS_DIR
from .workspace import Workspace

TEMPLATE = PROMPTS_DIR / "chat_template.jinja"
EVAL_KEYS = {"eval_items", "eval_prompts", "eval_max_tokens"}  # evaluation settings: not part of a model's identity


class TrainError(Exception):
    """A generation that cannot be trained as asked; the message says what to do."""


def models_dir(ws: Workspace) -> Path:
    return ws.root / "models"


def model_dir(ws: Workspace, generation: int) -> Path:
    return models_dir(ws) / f"gen-{generation:04d}"


def chat_template(ws: Workspace, cfg: TrainConfig) -> str:
    """The training chat template: train.chat_template, or the project's (ChatML)."""
    path = ws.resolve(cfg.chat_template) if cfg.chat_template else TEMPLATE
    if not path.is_file():
        raise TrainError(f"train.chat_template: {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if "{% generation %}" not in text.replace("{%- generation %}", "{% generation %}"):
        raise TrainError(f"{path}: no {{% generation %}} markers: TRL's assistant_only_loss needs them around the "
                         "`internal` turns")
    return text


def base_checkpoint(ws: Workspace, spec: str) -> tuple[Path, dict]:
    """The base model as a transformers checkpoint and where it came from. A GGUF (a path or
    bundled:NAME) is dequantized once into WS/models/base/ and reused while its sha256 holds."""
    if not spec.startswith("bundled:"):
        local = ws.resolve(spec)
        if local.is_dir():
            check_checkpoint(local)
            return local, {"model": spec, "format": "transformers checkpoint", "sha256": weights_sha256(local)}
        spec = str(local)
    try:
        gguf = resolve_model(spec)
    except ModelNotFound as exc:
        raise ModelNotFound(f"train.base_model: {exc}") from None
    source = {"model": spec if spec.startswith("bundled:") else str(gguf), "format": "gguf", "file": gguf.name,
              "sha256": file_sha256(gguf)}
    out = models_dir(ws) / "base"
    info = out / "source.json"
    if info.is_file() and json.loads(info.read_text(encoding="utf-8")).get("sha256") == source["sha256"]:
        return out, source
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(".base.export")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(exported(gguf), staging)  # a copy: the workspace's own, whatever happens to the cache
    (staging / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    _replace(staging, out)
    return out, source


def _replace(new: Path, out: Path) -> None:
    """Put `new` at `out`, replacing what was there, by renames (no half-written folder at `out`)."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    new.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def compiled_manifest(ws: Workspace, generation: int) -> dict:
    path = ws.generation_dir(generation) / "manifest.json"
    if not path.is_file():
        raise TrainError(f"generation {generation} is not compiled ({path.parent} has no manifest.json): run "
                         f"`ratchet build --generation {generation}` first")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if "sft" not in manifest.get("splits", {}):
        raise TrainError(f"generation {generation} has no sft split (no reflection was kept, see its card): "
                         "nothing to train on")
    return manifest


def read_split(ws: Workspace, generation: int, manifest: dict, split: str, columns: list[str]):
    """One compiled split as an in-memory `datasets.Dataset` of the columns the trainer needs."""
    import datasets
    import pyarrow.parquet as pq

    table = pq.read_table(ws.generation_dir(generation) / manifest["splits"][split], columns=columns)
    return datasets.Dataset.from_list(table.to_pylist())


def training_documents(ws: Workspace, generation: int, manifest: dict, cfg: TrainConfig, say=lambda line: None):
    """What SFT trains on: the sft split, and the explored split's examples when the generation
    has one and train.explored = "predict" (their `Naive_Explorer` turns carry the loss)."""
    sft = read_split(ws, generation, manifest, "sft", ["messages"])
    if "explored" not in manifest["splits"]:
        return sft
    if cfg.explored == "skip":
        say("explored split left out (train.explored = \"skip\")")
        return sft
    import datasets

    explored = read_split(ws, generation, manifest, "explored", ["messages"])
    say(f"explored split: {len(explored)} example(s) predicted as Naive_Explorer's turns")
    return datasets.concatenate_datasets([sft, explored])


def start_model(ws: Workspace, generation: int, cfg: TrainConfig) -> tuple[Path, dict]:
    """Generation N trains from models/gen-(N-1) when it exists, else from the base model."""
    if generation > 1:
        parent = model_dir(ws, generation - 1)
        if parent.is_dir():
            check_checkpoint(parent)
            return parent, {"model": parent.name, "format": "transformers checkpoint", "sha256": weights_sha256(parent)}
    return base_checkpoint(ws, cfg.base_model)


def use_cpu(cfg: TrainConfig) -> bool:
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device = cuda but torch sees no CUDA device")
    return cfg.device == "cpu" or not torch.cuda.is_available()


def lora_config(cfg: TrainConfig):
    if not cfg.use_lora:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise TrainError("train.use_lora needs peft: `pip install peft` (or set use_lora = false)") from None
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, task_type="CAUSAL_LM",
                      target_modules="all-linear")


def common_args(cfg: TrainConfig, output_dir: Path) -> dict:
    return {"output_dir": str(output_dir), "per_device_train_batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.grad_accumulation, "max_length": cfg.max_length,
            "bf16": cfg.bf16, "use_cpu": use_cpu(cfg),
            "seed": cfg.seed, "data_seed": cfg.seed, "report_to": "none", "save_strategy": "no", "logging_steps": 1,
            "disable_tqdm": True, "dataloader_num_workers": 0,
            # said either way: TRL's configs default to True, which would ignore `gradient_checkpointing = false`
            "gradient_checkpointing": cfg.gradient_checkpointing}


@contextmanager
def torch_threads(n: int):
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def quiet():
    """No progress bars from datasets and transformers, no deprecation notices from inside
    TRL: the CLI prints one line per step (step_reporter) and a summary instead."""
    import warnings

    import datasets.utils as ds_utils
    from transformers.utils import logging as hf_logging

    ds_bars, hf_bars = ds_utils.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    ds_utils.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
            yield
    finally:
        if ds_bars:
            ds_utils.enable_progress_bars()
        if hf_bars:
            hf_logging.enable_progress_bar()


def step_reporter(trainer, stage: str, say) -> None:
    """Replace the trainer's printed log dicts with one line per step."""
    from transformers import PrinterCallback, TrainerCallback

    class Report(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                say(f"  {stage} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}")

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Report())


def stage_summary(trainer, result, examples: int, seconds: float) -> dict:
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    if not all(math.isfinite(x) for x in [*losses, result.training_loss]):
        raise TrainError(f"training diverged (loss {losses}): lower the learning rate")
    out = {"steps": result.global_step, "examples": examples, "train_loss": round(result.training_loss, 4),
           "losses": losses, "seconds": round(seconds, 1),
           "seconds_per_step": round(seconds / max(result.global_step, 1), 2)}
    rewards = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    if rewards:
        out["reward_accuracy"] = round(sum(h["rewards/accuracies"] for h in rewards) / len(rewards), 4)
        out["reward_margin"] = round(sum(h["rewards/margins"] for h in rewards) / len(rewards), 4)
    return out


def _merged(model):
    """A peft model's adapters merged into its weights (a plain model is returned as it is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


WORD_JOINER = "\u2060"  # invisible, and no tokenizer's special token contains it


def plain_text_for(tokenizer):
    """A function that breaks every spelling of one of the tokenizer's special tokens (its
    end-of-turn, start-of-turn, unk, ...) by a word joiner after its first character. TRL renders
    messages with the chat template and tokenizes the result with special tokens allowed, so a
    passage (or a reflection) holding `<|im_end|><|im_start|>assistant` would otherwise become real
    turn boundaries at training time; the prompt path already keeps such text plain."""
    spellings = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    pattern = re.compile("|".join(map(re.escape, spellings))) if spellings else None

    def plain(text: str) -> str:
        while pattern is not None and text and pattern.search(text):
            text = pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)
        return text
    return plain


def plain_messages(dataset, tokenizer, columns: tuple[str, ...]):
    """The dataset with every message's content made plain text (see plain_text_for)."""
    plain = plain_text_for(tokenizer)
    return dataset.map(lambda row: {c: [{**m, "content": plain(m["content"])} for m in row[c]] for c in columns})


def run_trainer(trainer, stage: str, examples: int, say):
    """Train with a TRL trainer, a line per step: (the trained model, LoRA adapters merged; its summary)."""
    step_reporter(trainer, stage, say)
    started = time.perf_counter()
    result = trainer.train()
    return _merged(trainer.model), stage_summary(trainer, result, examples, time.perf_counter() - started)


def run_sft(model, tokenizer, dataset, cfg: TrainConfig, scratch: Path, say=lambda line: None):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**common_args(cfg, scratch / "sft"), max_steps=cfg.sft_steps, learning_rate=cfg.sft_learning_rate,
                     assistant_only_loss=True, dataset_kwargs={"skip_prepare_dataset": False})
    trainer = SFTTrainer(model=model, args=args, train_dataset=plain_messages(dataset, tokenizer, ("messages",)),
                         processing_class=tokenizer, peft_config=lora_config(cfg))
    return run_trainer(trainer, "SFT", len(dataset), say)


def run_dpo(model, tokenizer, dataset, cfg: TrainConfig, scratch: Path, say=lambda line: None):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**common_args(cfg, scratch / "dpo"), max_steps=cfg.dpo_steps, learning_rate=cfg.dpo_learning_rate,
                     beta=cfg.dpo_beta)
    # No ref_model: the trainer takes a frozen copy of the model it starts from (the SFT result)
    # as the reference, or, with LoRA, the same model with its adapters switched off.
    dataset = plain_messages(dataset, tokenizer, ("prompt", "chosen", "rejected"))
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora_config(cfg))
    return run_trainer(trainer, "DPO", len(dataset), say)


def identity(ws: Workspace, generation: int, manifest: dict, start: dict, cfg: TrainConfig, template: str) -> dict:
    """What a trained model is a function of: rerunning with the same identity is a no-op."""
    return {"dataset_generation": generation, "dataset_config_hash": manifest.get("config_hash"),
            "splits": {k: v for k, v in sorted(manifest["splits"].items()) if k in ("sft", "dpo", "explored")},
            "start_model": start, "train": cfg.model_dump(exclude=EVAL_KEYS | unused_keys(manifest)),
            "chat_template_sha256": sha256(template)}


def unused_keys(manifest: dict) -> set[str]:
    """Settings that cannot change what this generation trains: left out of the identity, so that a
    model trained before the setting existed keeps its identity."""
    return set() if "explored" in manifest["splits"] else {"explored"}


def read_training(folder: Path) -> dict | None:
    path = folder / "training.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def train_generation(ws: Workspace, generation: int, config: RatchetConfig | None = None, overwrite: bool = False,
                     say=None) -> dict:
    """Train models/gen-NNNN on generation N's splits. Returns the summary (also in training.json).
    A model already trained with the same identity (dataset splits, start model, settings) is
    left as it is (`unchanged`); a different one is refused unless `overwrite`."""
    with ws.lock(), quiet():  # one writer per workspace: no build or evaluation runs beside the training
        return _train(ws, generation, (config or ws.config).train, overwrite, say or (lambda line: None))


def _train(ws: Workspace, generation: int, cfg: TrainConfig, overwrite: bool, say) -> dict:
    manifest = compiled_manifest(ws, generation)
    template = chat_template(ws, cfg)
    out = model_dir(ws, generation)
    start_path, start = start_model(ws, generation, cfg)
    ident = identity(ws, generation, manifest, start, cfg, template)
    existing = read_training(out)
    if existing is not None:
        if existing.get("identity") == ident:
            return {**existing, "unchanged": True}
        if not overwrite:
            raise TrainError(f"{out} exists and was trained from other data or settings: pass --overwrite to replace it")
    elif out.exists() and not overwrite:
        raise TrainError(f"{out} exists but holds no training.json: pass --overwrite to replace it")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(start_path))
    tokenizer.chat_template = template
    if "<|im_start|>" in template and "<|im_start|>" not in tokenizer.get_vocab():
        raise TrainError(f"{start_path}: its tokenizer has no <|im_start|> token, which the project's ChatML template "
                         "needs: set train.chat_template to a template in the model's own chat format")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    sft = training_documents(ws, generation, manifest, cfg, say)
    dpo_reason = None
    if cfg.dpo_steps == 0:
        dpo_reason = "train.dpo_steps = 0"
    elif "dpo" not in manifest["splits"]:
        dpo_reason = f"generation {generation} has no dpo split (no conscience pair was kept)"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    scratch = out.with_name(f".{out.name}.runs")
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    try:
        with torch_threads(cfg.threads):
            torch.manual_seed(cfg.seed)
            dtype = torch.bfloat16 if cfg.bf16 else torch.float32
            model = AutoModelForCausalLM.from_pretrained(str(start_path), dtype=dtype)
            say(f"SFT: {len(sft)} example(s), {cfg.sft_steps} step(s), from {start['model']}")
            model, sft_summary = run_sft(model, tokenizer, sft, cfg, scratch, say)
            if dpo_reason is None:
                dpo = read_split(ws, generation, manifest, "dpo", ["prompt", "chosen", "rejected"])
                say(f"DPO: {len(dpo)} pair(s), {cfg.dpo_steps} step(s)")
                model, dpo_summary = run_dpo(model, tokenizer, dpo, cfg, scratch, say)
            else:
                say(f"DPO skipped: {dpo_reason}")
                dpo_summary = {"skipped": dpo_reason}
            model.save_pretrained(str(partial), safe_serialization=True)
        tokenizer.save_pretrained(str(partial))  # with the project's chat template (chat_template.jinja)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from importlib.metadata import version

    summary = {
        "model": out.name, "output": str(out), "dataset_generation": generation,
        "dataset": str(ws.generation_dir(generation)), "dataset_config_hash": manifest.get("config_hash"),
        "start_model": start, "base_model": cfg.base_model, "weights_sha256": weights_sha256(partial),
        "sft": sft_summary, "dpo": dpo_summary, "seconds": round(time.perf_counter() - started, 1),
        "settings": cfg.model_dump(exclude=EVAL_KEYS), "device": "cpu" if use_cpu(cfg) else "cuda",
        "versions": {p: version(p) for p in ("torch", "transformers", "trl")}, "identity": ident}
    (partial / "training.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (partial / "README.md").write_text(model_card(summary), encoding="utf-8")
    _replace(partial, out)
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(summary: dict, evaluation: dict | None = None) -> str:
    """The model card: which dataset generation trained it, from which model, how, and with
    which results (the held-out evaluation when one ran)."""
    s = summary
    start = s["start_model"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [trl, sft" + (", dpo" if "steps" in s["dpo"] else "") + ", moral-ratchet]", "---", "",
             f"# {s['model']}: Moral Ratchet, trained on dataset generation {s['dataset_generation']}", "",
             f"- **Dataset**: `{s['dataset']}` (generation {s['dataset_generation']}, config hash "
             f"`{s['dataset_config_hash']}`; splits {', '.join(f'`{v}`' for v in s['identity']['splits'].values())})",
             f"- **Trained from**: `{start['model']}` ({start['format']}, sha256 `{start['sha256']}`"
             + (", dequantized into models/base/) — the base model" if start["format"] == "gguf" else
                ") — the base model" if start["model"] == s["base_model"] else ") — the previous generation's model"),
             f"- **Base model setting**: `{s['base_model']}`",
             f"- **Weights**: sha256 over `*.safetensors` `{s['weights_sha256']}`",
             f"- **Chat template**: the project's, with `text` and `internal` roles; the SFT loss is on the "
             f"`internal` reflections only (`assistant_only_loss`)",
             f"- **Device**: {s['device']}; torch {s['versions']['torch']}, transformers {s['versions']['transformers']}, "
             f"TRL {s['versions']['trl']}", "", "## Training", "",
             "| stage | steps | examples | final-step loss | mean loss | s/step |", "| --- | --- | --- | --- | --- | --- |"]
    for name in ("sft", "dpo"):
        st = s[name]
        if "steps" in st:
            lines.append(f"| {name.upper()} | {st['steps']} | {st['examples']} | {_fmt(st['losses'][-1] if st['losses'] else None)} "
                         f"| {_fmt(st['train_loss'])} | {st['seconds_per_step']} |")
        else:
            lines.append(f"| {name.upper()} | skipped: {st['skipped']} | | | | |")
    if "reward_accuracy" in s["dpo"]:
        lines += ["", f"DPO reward accuracy {_fmt(s['dpo']['reward_accuracy'])}, margin {_fmt(s['dpo']['reward_margin'])}."]
    st = s["settings"]
    lines += ["", f"Settings: batch {st['batch_size']} × accumulation {st['grad_accumulation']}, max_length "
              f"{st['max_length']}, learning rates SFT {st['sft_learning_rate']} / DPO {st['dpo_learning_rate']}, "
              f"DPO beta {st['dpo_beta']}, bf16 {str(st['bf16']).lower()}, LoRA "
              f"{'r=%d alpha=%d (merged)' % (st['lora_r'], st['lora_alpha']) if st['use_lora'] else 'off'}, seed {st['seed']}. "
              f"{s['seconds']} s in all."]
    if evaluation:
        e = evaluation
        lines += ["", "## Held-out evaluation", "",
                  f"Responses to {e['n']} held-out prompts of `{e['items']}` (never trained on), labelled by the frozen "
                  f"judge `{e['judge']}`:", "", "| framework | unethical rate | labels |", "| --- | --- | --- |"]
        for fw, r in e["frameworks"].items():
            lines.append(f"| {fw} | {_fmt(r['rate'])} | {', '.join(f'{k} {v}' for k, v in r['counts'].items())} |")
    lines += ["", "Use it as the next generation's annotator:", "", "```toml", "[[ensemble.members]]",
              f'name = "{s["model"]}"', f'model = "{s["output"]}"', f'backend = "{registry.DEFAULT_CHECKPOINT_ENGINE}"',  # a folder is not
              # resolved against the workspace: the absolute path works from anywhere
              'roles = ["annotate"]', "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- the loop


def loop_config(base: RatchetConfig, ws: Workspace, generation: int,
                engine: str = registry.DEFAULT_CHECKPOINT_ENGINE) -> RatchetConfig:
    """Generation N > 1 is annotated by models/gen-(N-1) as one more ensemble member (the first
    annotator's persona, annotate only). The frozen generation-0 model stays the conscience and
    consent judge (those keys do not change) and the panel (frozen in DuckDB by generation 1)."""
    if generation == 1:
        return base
    from .config import MemberConfig

    trained = model_dir(ws, generation - 1)
    first = next(m for m in base.ensemble.members if "annotate" in m.roles)
    member = MemberConfig(name=trained.name, model=str(trained), backend=engine, persona=first.persona,
                          roles=["annotate"])
    taken = [m.display_name for m in base.ensemble.members]
    if member.name in taken:
        raise TrainError(f"ensemble.members already has a member named {member.name}: rename it")
    ensemble = base.ensemble.model_copy(update={"members": [*base.ensemble.members, member]})
    return base.model_copy(update={"ensemble": ensemble})


def run_loop(ws: Workspace, generations: int, engine: str = registry.DEFAULT_CHECKPOINT_ENGINE, progress=None, say=None,
             overwrite: bool = False, executor: str | None = None) -> dict:
    """build → evaluate → train → build …: for g in 1..K, evaluate generation g's annotator
    model (the base for g = 1, models/gen-(g-1) after) on the held-out prompts, build
    generation g on the same passages, and train models/gen-g unless g = K. Finished builds,
    trained models and evaluations are reused (every model call is cached)."""
    with quiet():
        return _loop(ws, generations, engine, progress, say or (lambda line: None), overwrite, executor)


def _loop(ws: Workspace, generations: int, engine: str, progress, say, overwrite: bool, executor: str | None) -> dict:
    from .build import run_build
    from .evaluate import evaluate_model, record_generation

    base = ws.config
    out = []
    for g in range(1, generations + 1):
        cfg = loop_config(base, ws, g, engine)
        if g == 1:
            annotator, path = "base", base_checkpoint(ws, base.train.base_model)[0]
        else:
            annotator, path = model_dir(ws, g - 1).name, model_dir(ws, g - 1)
        say(f"generation {g}: evaluating its annotator model {annotator} on the held-out prompts")
        evaluation = evaluate_model(ws, path, annotator, cfg, backend=engine, generation=g)
        if g > 1:  # the trained model's card gets its held-out figures
            summary = read_training(path)
            (path / "README.md").write_text(model_card(summary, evaluation), encoding="utf-8")
        record_generation(ws, g, annotator, evaluation, None)
        say(f"generation {g}: building")
        built = run_build(ws, generation=g, config=cfg, progress=progress, overwrite=overwrite, executor_kind=executor)
        trained = None
        if g < generations:
            say(f"generation {g}: training {model_dir(ws, g).name}")
            trained = train_generation(ws, g, cfg, overwrite=overwrite, say=say)
        figures = record_generation(ws, g, annotator, None, built.get("ratchet"),
                                    trained["model"] if trained else None)
        out.append({"generation": g, "annotator": annotator, "evaluation": evaluation, "build": built,
                    "trained": trained})
    return {"generations": out, "figures": figures, "evaluation": str(ws.root / "models" / "evaluation.json"),
            "plot": str(ws.root / "models" / "evaluation.png")}
