"""The capability claim, with a control: `ratchet experiment capability`.

The preprint claims that training on interleaved epistemic annotation improves reasoning. Three
arms from the same base model, scored on held-out multiple-choice reasoning items by
log-likelihood over the answer options (as evaluation harnesses do):

  base       the base model (train.base_model), untrained
  annotated  SFT on a generation's sft split, as `ratchet train` does it (the passages with
             their `internal` reflections, the loss on the reflections)
  control    the same steps, learning rate, batch size and seeds on the same passages without
             the reflections (plain language modelling on the passage text)

The figure that matters is annotated - control: what the reflections add beyond more text from
the same passages. Each trained arm is trained once per seed (`seeds`); intervals are bootstrap
95 % over the items and the seeds, paired (every arm on the same resampled items and seeds). Everything lands in WS/experiments/capability/: the trained arms
(reused while their identity holds), each arm's scores (reused while the model and the items
hold), results.json and capability.png.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..cache import sha256
from ..config import RatchetConfig, TrainConfig
from ..resources import EXAMPLES_DIR
from ..train import (base_checkpoint, chat_template, common_args, compiled_manifest, plain_text_for, read_split,
                     run_sft, run_trainer, torch_threads, use_cpu)
from ..workspace import Workspace
from .arms import (ExperimentError, arm_settings, contrast_panel, error_bars, experiment_folder, subplots,
                   train_arm, write_results)
from ..stats import paired_interval as interval

BUNDLED_ITEMS = EXAMPLES_DIR / "reasoning" / "reasoning-mc.jsonl"
ARMS = ("base", "annotated", "control")
CONTRASTS = (("annotated", "control"), ("annotated", "base"), ("control", "base"))


@dataclass(frozen=True)
class Item:
    id: str
    category: str
    question: str
    choices: tuple[str, ...]
    answer: int


# --- the items ---------------------------------------------------------------------------------------

def load_items(spec: str, ws: Workspace, limit: int = 0) -> tuple[list[Item], str]:
    """The multiple-choice items (the bundled set, or a file or `datasets` folder in the same
    format) and where they came from. A row without a question, with fewer than two choices or
    an answer that is not one of their indexes is an error naming the file and the row."""
    import datasets

    path = ws.resolve(spec) if spec else BUNDLED_ITEMS
    where = "experiments.capability.items"
    if not path.exists():
        raise ExperimentError(f"{where}: {path}: no such file or folder")
    try:
        if path.is_dir():
            rows = datasets.load_from_disk(str(path)) if (path / "dataset_info.json").exists() or \
                (path / "state.json").exists() or (path / "dataset_dict.json").exists() else datasets.load_dataset(str(path))
            if isinstance(rows, (datasets.DatasetDict, dict)):  # the held-out split: test, else validation
                split = next((name for name in ("test", "validation") if name in rows), None)
                if split is None and len(rows) == 1:
                    split = next(iter(rows))
                if split is None:
                    raise ExperimentError(f"{where}: {path}: splits {', '.join(rows)}, none of them test or "
                                          "validation: save the split to score on its own")
                rows, path = rows[split], Path(f"{path} [split {split}]")
        else:
            kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
            if kind is None:
                raise ExperimentError(f"{where}: {path}: expected a .jsonl, .json or .parquet file or a datasets folder")
            rows = datasets.load_dataset(kind, data_files=str(path), split="train")
    except ExperimentError:
        raise
    except Exception as exc:  # datasets' own errors: say which file
        raise ExperimentError(f"{where}: {path}: cannot be read as a dataset ({type(exc).__name__}: {exc})") from None
    items = []
    for n, row in enumerate(rows):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ExperimentError(f"{path}: row {n + 1}: no question")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ExperimentError(f"{path}: row {n + 1}: choices must be a list of at least two strings")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ExperimentError(f"{path}: row {n + 1}: answer must be the index of the right choice "
                                  f"(0..{len(choices) - 1}), not {answer!r}")
        items.append(Item(str(row.get("id") or n), str(row.get("category") or "all"), row["question"], tuple(choices),
                          answer))
    if not items:
        raise ExperimentError(f"{where}: {path}: no items")
    return (items[:limit] if limit else items), str(path)


def prompt(item: Item) -> str:
    return f"Question: {item.question}\nAnswer:"


# --- scoring -------------------------------------------------------------------------------------------

def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer starts every text with it by default (Gemma, Llama), else None."""
    bos = tokenizer.bos_token_id
    return bos if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else None


def encode(tokenizer, item: Item, bos: int | None = None) -> list[tuple[list[int], int]]:
    """Per choice, (token ids of question + choice, number of choice tokens), as lm-evaluation-
    harness encodes them: the choice's tokens are those of the whole text after the question's
    (so a tokenizer that merges across the space is not given an extra one), after `bos`
    (leading_bos) when there is one."""
    context = tokenizer(prompt(item), add_special_tokens=False)["input_ids"]
    out = []
    for choice in item.choices:
        whole = tokenizer(prompt(item) + " " + choice, add_special_tokens=False)["input_ids"]
        if whole[:len(context)] == context and len(whole) > len(context):
            ids, n = whole, len(whole) - len(context)
        else:  # the boundary token merged with the choice: the question's tokens, then the choice's
            tail = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids, n = context + tail, len(tail)
        out.append(([bos] + ids if bos is not None else ids, n))
    return out


def choice_logprobs(model, tokenizer, items: list[Item], batch_items: int = 8, device: str = "cpu",
                    fast: bool = True) -> list[list[float]]:
    """Per item, the summed log-probability of each choice's tokens after the question. `fast`
    puts only the positions that predict a choice's tokens through the output layer (a 49k-word
    vocabulary at every position was most of the time and memory); score_arm checks it against
    the model's own forward pass first (some models scale or cap their logits there)."""
    import torch

    out, bos = [], leading_bos(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(items), batch_items):
        chunk = items[start:start + batch_items]
        sequences = [pair for item in chunk for pair in encode(tokenizer, item, bos)]  # (ids, choice tokens at the end)
        width = max(len(ids) for ids, _ in sequences)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s, _ in sequences], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s, _ in sequences], device=device)
        rows = [k for k, (s, n) in enumerate(sequences) for _ in range(n)]
        cols = [len(s) - n - 1 + j for s, n in sequences for j in range(n)]
        with torch.no_grad():
            if fast:
                hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
                logits = model.get_output_embeddings()(hidden[rows, cols]).float()
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits[rows, cols].float()
        targets = ids[rows, [c + 1 for c in cols]]
        picked = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].cpu().tolist()
        sums, at = [], 0
        for _, n in sequences:
            sums.append(sum(picked[at:at + n]))
            at += n
        for k, item in enumerate(chunk):
            first = sum(len(i.choices) for i in chunk[:k])
            out.append(sums[first:first + len(item.choices)])
    return out


SCORING = 2  # bump when scoring changes: stored scores of another version are not reused


def score_arm(folder: Path, model_path: Path, items: list[Item], items_sha: str, say, device: str = "cpu") -> list[list[float]]:
    """An arm's choice log-probabilities, reused while the model's weights, the items and the
    scoring are the same. Every arm is scored in float32, whatever its checkpoint stores."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import weights_sha256

    model_sha = weights_sha256(model_path)
    cache = folder / "scores" / f"{model_path.name}-{model_sha[:12]}.json"
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("items_sha256") == items_sha and stored.get("scoring") == SCORING:
            return stored["logprobs"]
    say(f"scoring {model_path.name} on {len(items)} item(s)")
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval().to(device)
    probe = items[:1]
    fast = abs(choice_logprobs(model, tokenizer, probe, device=device)[0][0]
               - choice_logprobs(model, tokenizer, probe, device=device, fast=False)[0][0]) < 1e-3
    if not fast:
        say(f"{model_path.name}: its forward pass changes the logits; scoring with full logits (slower)")
    logprobs = choice_logprobs(model, tokenizer, items, device=device, fast=fast)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"model_sha256": model_sha, "items_sha256": items_sha, "scoring": SCORING,
                                 "logprobs": logprobs}) + "\n", encoding="utf-8")
    return logprobs


# --- training the two arms ----------------------------------------------------------------------------

def control_dataset(sft, tokenizer):
    """The sft split's passages without their reflections: one plain text per document."""
    import datasets

    plain = plain_text_for(tokenizer)
    return datasets.Dataset.from_list([{"text": plain("\n\n".join(m["content"] for m in row["messages"]
                                                                   if m["role"] == "text"))} for row in sft])


def run_text_lm(model, tokenizer, sft, cfg: TrainConfig, scratch: Path, say=lambda line: None):
    """The control: the sft split's passages without their reflections, plain language modelling
    (TRL's SFTTrainer, loss on every token)."""
    from trl import SFTConfig, SFTTrainer

    dataset = control_dataset(sft, tokenizer)
    args = SFTConfig(**common_args(cfg, scratch / "control"), max_steps=cfg.sft_steps,
                     learning_rate=cfg.sft_learning_rate, dataset_text_field="text")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return run_trainer(trainer, "control", len(dataset), say)


TRAINERS = {"annotated": run_sft, "control": run_text_lm}  # each (model, tokenizer, sft, cfg, scratch, say)


# --- the figures ---------------------------------------------------------------------------------------

def correct(logprobs: list[list[float]], items: list[Item], normalised: bool = False) -> list[int]:
    """1 where the most likely choice is the right one (normalised: per character of the choice)."""
    out = []
    for scores, item in zip(logprobs, items):
        values = [s / max(1, len(c)) for s, c in zip(scores, item.choices)] if normalised else scores
        out.append(int(max(range(len(values)), key=values.__getitem__) == item.answer))
    return out


def figures(logprobs: dict[str, list], items: list[Item], n: int, seed: int) -> dict:
    """logprobs: arm -> one list of per-item choice log-probabilities per trained seed (one for base)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    seeds = max(len(runs) for runs in logprobs.values())
    items_drawn = rng.integers(0, len(items), size=(n, len(items)))
    seeds_drawn = rng.integers(0, seeds, size=(n, seeds))
    hits = {arm: np.array([correct(lp, items) for lp in runs]) for arm, runs in logprobs.items()}
    norm = {arm: np.array([correct(lp, items, normalised=True) for lp in runs]) for arm, runs in logprobs.items()}
    categories = sorted({i.category for i in items})
    out = {"items": len(items), "seeds": seeds, "chance": round(float(np.mean([1 / len(i.choices) for i in items])), 4),
           "arms": {}, "contrasts": {}}
    for arm in logprobs:
        by_category = {}
        for c in categories:
            idx = [k for k, i in enumerate(items) if i.category == c]
            by_category[c] = {"items": len(idx), "accuracy": round(float(hits[arm][:, idx].mean()), 4)}
        out["arms"][arm] = {"accuracy": interval(hits[arm], items_drawn, seeds_drawn),
                            "accuracy_norm": interval(norm[arm], items_drawn, seeds_drawn),
                            "per_seed": [round(float(row.mean()), 4) for row in hits[arm]],
                            "by_category": by_category}
    for a, b in CONTRASTS:
        if a in hits and b in hits:  # the base model's single row is each seed's reference
            out["contrasts"][f"{a} - {b}"] = {
                "accuracy": interval(hits[a] - hits[b], items_drawn, seeds_drawn),
                "accuracy_norm": interval(norm[a] - norm[b], items_drawn, seeds_drawn)}
    return out


def plot(result: dict):
    arms = list(result["arms"])
    fig, (left, right) = subplots(1, 2, figsize=(9, 3.6))
    acc = [result["arms"][a]["accuracy"] for a in arms]
    left.bar(arms, [x["mean"] for x in acc], yerr=error_bars(acc),
             capsize=4, color=["#999999", "#3b6ea5", "#c98b2b"][:len(arms)])
    left.axhline(result["chance"], ls="--", color="black", lw=0.8, label="chance")
    left.set_ylabel("accuracy (log-likelihood)")
    left.set_ylim(0, 1)
    left.legend(loc="upper right", fontsize=8)
    left.set_title(f"{result['items']} items x {result['seeds']} training seed(s), bootstrap 95% CI", fontsize=9)
    names = list(result["contrasts"])
    contrast_panel(right, names, [result["contrasts"][n]["accuracy"] for n in names], "accuracy difference (paired)",
                   "annotated - control is the figure that matters")
    return fig


# --- the experiment ------------------------------------------------------------------------------------

def experiment_dir(ws: Workspace) -> Path:
    return experiment_folder(ws, "capability")


def run_capability(ws: Workspace, generation: int = 1, config: RatchetConfig | None = None, say=None) -> dict:
    """Train the two arms (unless trained with the same identity), score the three, and write
    results.json and capability.png. Returns the results."""
    from ..train import quiet

    say = say or (lambda line: None)
    cfg = config or ws.config
    c = cfg.experiments.capability
    with ws.lock(), quiet():
        items, source = load_items(c.items, ws, c.limit)
        items_sha = sha256([asdict(i) for i in items])
        folder = experiment_dir(ws)
        manifest = compiled_manifest(ws, generation)
        sft = read_split(ws, generation, manifest, "sft", ["messages"])
        tcfg = arm_settings(cfg.train, c)
        template = chat_template(ws, tcfg)
        base_path, base = base_checkpoint(ws, tcfg.base_model)
        trained, paths = {}, {"base": [base_path], "annotated": [], "control": []}
        for seed in c.seeds:  # each trained arm once per seed: the intervals then cover training's randomness
            seeded = tcfg.model_copy(update={"seed": seed})
            for arm in TRAINERS:
                identity = {"arm": arm, "base": base["sha256"], "dataset_generation": generation,
                            "sft_split": manifest["splits"]["sft"], "dataset_config_hash": manifest.get("config_hash"),
                            "train": seeded.model_dump(include={"sft_steps", "sft_learning_rate", "batch_size",
                                                                "max_length", "seed", "bf16", "device"}),
                            "chat_template_sha256": sha256(template)}
                out = folder / "models" / f"{arm}-s{seed}"
                trained[out.name] = train_arm(arm, TRAINERS[arm], out, base_path, sft, seeded, template, identity, say)
                paths[arm].append(out)
        with torch_threads(tcfg.threads):
            device = "cpu" if use_cpu(tcfg) else "cuda"
            logprobs = {arm: [score_arm(folder, path, items, items_sha, say, device) for path in paths[arm]]
                        for arm in ARMS}
        result = {"generation": generation, "items_source": source, "items_sha256": items_sha,
                  "base_model": base["model"], "documents": len(sft),
                  "settings": c.model_dump(), **figures(logprobs, items, c.bootstrap, c.seeds[0]),
                  "training": {name: t["training"] for name, t in trained.items()},
                  "reused": sorted(name for name, t in trained.items() if t.get("unchanged"))}
        return write_results(folder, result, plot)

