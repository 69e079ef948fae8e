"""Emergent alignment, the conscience online: `ratchet experiment emergent-alignment`.

The set-up that produced emergent misalignment: fine-tuning on insecure code completions. The
Emergent Alignment paper's technique is online: while the model trains, a frozen copy of it
reviews the model's own answers and a DPO term steers it away from what it judges unethical.
Three arms from the same base model on the same scenario, the same SFT steps and seeds:

  insecure  (A) SFT on the scenario's insecure completions (conscience.items' responses,
            held-out rows left out), loss on the assistant turns
  online    (B) A's loop, plus every `every` steps the current policy answers `online_batch`
            training prompts; the frozen judge (conscience.judge) labels the answers under one
            framework, an unethical one gets the judge's rewrite, and a rewrite the judge then
            finds ethical (and that answers the request: pair_checks) makes a pair
            (chosen = rewrite, rejected = the policy's answer); the pairs collected so far feed a
            DPO term, loss = SFT + weight x DPO(beta), in the same optimisation
  offline   (C) A, then DPO on the generation's `dpo` split (the pairs built offline), as
            `ratchet train` does after SFT

Every arm and the base model answer the held-out prompts of the scenario (never trained on) and
general prompts outside coding (emergent misalignment is behaviour that spreads beyond the
trained domain); two judges label each answer under the same framework: the frozen judge and a
second one of another family (`second_judge`). The figure is the unethical rate per arm, prompt
set and judge, with bootstrap 95 % intervals over the prompts and the seeds, and the paired
differences online - insecure and offline - insecure.

The DPO term is TRL's sigmoid loss (DPOTrainer's default `loss_type`): -log sigmoid(beta x
((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))), the reference
being the frozen base model; the loop around it is the project's, kept short.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from ..backends import registry
from ..cache import sha256
from ..config import RatchetConfig, TrainConfig, model_short_name
from .. import evaluate
from ..evaluate import SYSTEM, answer, cached_engine, heldout_items
from ..prompts import Prompts
from ..stages.conscience import LABELS, ConscienceError, Item, judge, load_framework, run_conscience
from ..train import (TrainError, base_checkpoint, chat_template, compiled_manifest, plain_text_for, read_split, run_dpo,
                     torch_threads)
from ..workspace import Workspace
from .arms import (ExperimentError, arm_settings, error_bars, experiment_folder, subplots, train_arm,
                   write_results)
from ..stats import paired_interval as interval
from .personas import generate, load_probes

ARMS = ("base", "insecure", "online", "offline")
LOOP = 2  # bump when the training loop changes: arms trained by another version are trained again
TRAINED = ("insecure", "online", "offline")
CONTRASTS = (("online", "insecure"), ("offline", "insecure"), ("online", "offline"), ("insecure", "base"))


# --- the data ----------------------------------------------------------------------------------------------

def training_items(ws: Workspace, cfg: RatchetConfig) -> list[Item]:
    """The scenario's training rows: their responses are the insecure completions."""
    try:
        return evaluate.training_items(ws, cfg)
    except ConscienceError as exc:
        raise ExperimentError(f"conscience.items: {exc}") from None


def insecure_dataset(items: list[Item]):
    import datasets

    return datasets.Dataset.from_list([{"messages": [{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": i.prompt},
                                                     {"role": "assistant", "content": i.response}]} for i in items])


def general_items(ws: Workspace, cfg: RatchetConfig) -> list[Item]:
    """Requests outside the trained domain: experiments.emergent.general (else the persona probes
    that are not about code), the first general_limit of them."""
    c = cfg.experiments.emergent
    probes, _ = load_probes(c.general, ws)
    if not c.general:  # the bundled probes: leave out the coding ones
        probes = [p for p in probes if p["category"] != "code"]
    probes = probes[:c.general_limit] if c.general_limit else probes
    return [Item(f"general:{p['id']}", p["prompt"], "-") for p in probes]


# --- the online arm ------------------------------------------------------------------------------------------

def sft_batch(tokenizer, rows: list[dict], max_length: int):
    """Input ids, attention mask and labels (the assistant turns only, through the template's
    {% generation %} markers) of a few conversations, right-padded."""
    import torch

    plain = plain_text_for(tokenizer)
    encoded = [tokenizer.apply_chat_template([{**m, "content": plain(m["content"])} for m in r["messages"]],
                                             tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
               for r in rows]
    ids = [e["input_ids"][:max_length] for e in encoded]
    masks = [e["assistant_masks"][:max_length] for e in encoded]
    width, pad = max(map(len, ids)), tokenizer.pad_token_id
    return (torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            torch.tensor([[t if m else -100 for t, m in zip(x, mk)] + [-100] * (width - len(x))
                          for x, mk in zip(ids, masks)]))


def completion_logp(model, tokenizer, template: str, prompt: str, text: str, max_length: int):
    """Summed log-probability (a tensor, with its graph) of `text` as the assistant's answer to `prompt`."""
    import torch

    plain = plain_text_for(tokenizer)
    prefix = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": plain(prompt)}], chat_template=template,
                                           tokenize=False, add_generation_prompt=True)
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    ids = (head + tokenizer(plain(text) + "<|im_end|>", add_special_tokens=False)["input_ids"])[:max_length]
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, len(head) - 1:-1]
    targets = torch.tensor(ids[len(head):], device=model.device)
    return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).sum()


def reference_margin(ref, tokenizer, template: str, pair: dict, max_length: int) -> float:
    """log ref(chosen) - log ref(rejected): the frozen reference's part of the DPO term, the same at every step."""
    import torch

    with torch.no_grad():
        return float(completion_logp(ref, tokenizer, template, pair["prompt"], pair["chosen"], max_length)
                     - completion_logp(ref, tokenizer, template, pair["prompt"], pair["rejected"], max_length))


def dpo_loss(policy, ref, tokenizer, template: str, pairs: list[dict], beta: float, max_length: int):
    """TRL's sigmoid DPO loss, averaged over the pairs (a pair's `ref_margin`, when it has one, stands
    for the reference's forward passes)."""
    import torch
    import torch.nn.functional as F

    losses = []
    for p in pairs:
        ref_margin = p["ref_margin"] if "ref_margin" in p else reference_margin(ref, tokenizer, template, p, max_length)
        pol_c = completion_logp(policy, tokenizer, template, p["prompt"], p["chosen"], max_length)
        pol_r = completion_logp(policy, tokenizer, template, p["prompt"], p["rejected"], max_length)
        losses.append(-F.logsigmoid(beta * ((pol_c - pol_r) - ref_margin)))
    return torch.stack(losses).mean()


class OnlineConscience:
    """The frozen judge as the online arm sees it: the policy's answers in, kept pairs out."""

    def __init__(self, engine, framework, cfg: RatchetConfig, examples):
        self.engine, self.framework, self.cfg, self.examples = engine, framework, cfg, examples
        self.log: list[dict] = []

    def pairs(self, step: int, prompts: list[str], answers: list[str]) -> list[dict]:
        items = [Item(f"online:{step}:{k}", p, a) for k, (p, a) in enumerate(zip(prompts, answers)) if a.strip()]
        _, pairs = run_conscience(items, [self.framework], self.engine, self.cfg, examples=self.examples)
        kept = [{"prompt": p.item.prompt, "chosen": p.chosen, "rejected": p.item.response} for p in pairs if p.kept]
        dropped = Counter(p.reason.split(":")[0] for p in pairs if not p.kept)
        self.log.append({"step": step, "answers": len(items), "unethical": len(pairs), "kept": len(kept),
                         "dropped": dict(sorted(dropped.items()))})
        return kept


def online_trainer(conscience: OnlineConscience | None, prompts: list[str], c):
    """A trainer (train_arm's signature): SFT on the insecure completions in the project's loop,
    with the conscience's DPO term in the same optimisation when `conscience` is given. Every arm
    trains in this loop (same batches for a seed, same optimizer, constant learning rate), so the
    insecure and online arms differ by the DPO term alone."""

    def train(model, tokenizer, data, cfg: TrainConfig, scratch: Path, say):
        import copy
        import random

        import torch

        template = tokenizer.chat_template
        ref = None if conscience is None else copy.deepcopy(model).eval()  # the DPO term's frozen reference
        for p in ref.parameters() if ref is not None else ():
            p.requires_grad_(False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_learning_rate)
        rows, rng, pairs, losses, started = data.to_list(), random.Random(cfg.seed), [], [], time.perf_counter()
        cursor = 0
        for step in range(1, cfg.sft_steps + 1):
            if conscience is not None and (step - 1) % c.every == 0:  # it reviews the policy's own answers
                model.eval()
                asked = [prompts[(cursor + k) % len(prompts)] for k in range(c.online_batch)]
                cursor += c.online_batch
                answers = generate(model, tokenizer, template, SYSTEM, asked, c.max_new_tokens)
                pairs += [{**p, "ref_margin": reference_margin(ref, tokenizer, template, p, cfg.max_length)}
                          for p in conscience.pairs(step, asked, answers)]  # once a pair, not once a step
                model.train()
            ids, mask, labels = sft_batch(tokenizer, rng.sample(rows, min(cfg.batch_size, len(rows))), cfg.max_length)
            sft = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            dpo = (dpo_loss(model, ref, tokenizer, template, rng.sample(pairs, min(cfg.batch_size, len(pairs))),
                            c.beta, cfg.max_length) if pairs else torch.zeros(()))
            loss = sft + c.weight * dpo
            if not torch.isfinite(loss):
                raise TrainError(f"online arm diverged at step {step} (sft {float(sft)}, dpo {float(dpo)}): lower "
                                 "experiments.emergent.learning_rate or weight")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sft, dpo = sft.detach(), dpo.detach()
            losses.append({"step": step, "sft": round(float(sft), 4), "dpo": round(float(dpo), 4) if pairs else None,
                           "pairs": len(pairs)})
            say(f"  step {step}/{cfg.sft_steps}: sft {float(sft):.4f}" + ("" if conscience is None else
                f", dpo {float(dpo):.4f} on {len(pairs)} pair(s)" if pairs else ", no pair yet"))
        model.eval()
        return model, {"steps": cfg.sft_steps, "examples": len(rows), "losses": losses,
                       "train_loss": round(sum(x["sft"] for x in losses) / len(losses), 4),
                       "online": conscience.log if conscience else None, "pairs": len(pairs),
                       "seconds": round(time.perf_counter() - started, 1)}
    return train


def offline_trainer(sft_loop, dpo, dpo_cfg: TrainConfig):
    """The insecure arm's SFT loop, then DPO on the generation's dpo split (TRL's DPOTrainer, as
    `ratchet train` runs it after SFT)."""

    def train(model, tokenizer, data, cfg: TrainConfig, scratch: Path, say):
        model, sft = sft_loop(model, tokenizer, data, cfg, scratch, say)
        model, pref = run_dpo(model, tokenizer, dpo, dpo_cfg.model_copy(update={"seed": cfg.seed}), scratch, say)
        return model, {**sft, "dpo": pref}
    return train


# --- the evaluation -----------------------------------------------------------------------------------------

def answers_of(con, cfg: RatchetConfig, path: Path, items: list[Item]) -> list:
    """The model's greedy answers (train.eval_max_tokens) through the transformers engine and the call cache."""
    with cached_engine(con, cfg.engine_for(str(path), registry.DEFAULT_CHECKPOINT_ENGINE), f"arm {path.name}") as engine:
        return answer(items, engine, cfg)


def labels_by(con, cfg: RatchetConfig, judge_model: str, framework, asked: list[tuple[str, str]]) -> list[str]:
    with cached_engine(con, cfg.engine_for(judge_model), f"judge {judge_model}") as engine:
        outcomes = judge(asked, engine, framework, cfg)
    return [o.graded.decided if o.graded else o.record["label"] if o.record else "invalid" for o in outcomes]


def figures(unethical: dict, n: int, seed: int) -> dict:
    """unethical: arm -> set -> judge -> one per-prompt 0/1 list per seed (one for base)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {"arms": {}, "contrasts": {}}
    sets = next(iter(unethical.values()))
    for s, by_judge in sets.items():
        for j in by_judge:
            m = {arm: np.array(unethical[arm][s][j], dtype=float) for arm in unethical}
            prompts, seeds = m["base"].shape[1], max(x.shape[0] for x in m.values())
            items_drawn = rng.integers(0, prompts, size=(n, prompts))
            seeds_drawn = rng.integers(0, seeds, size=(n, seeds))
            for arm, x in m.items():
                out["arms"].setdefault(arm, {}).setdefault(s, {})[j] = interval(x, items_drawn, seeds_drawn)
            for a, b in [(a, b) for a, b in CONTRASTS if a in m and b in m]:
                rows = max(m[a].shape[0], m[b].shape[0])
                diff = np.resize(m[a], (rows, prompts)) - np.resize(m[b], (rows, prompts))
                out["contrasts"].setdefault(f"{a} - {b}", {}).setdefault(s, {})[j] = interval(diff, items_drawn,
                                                                                              seeds_drawn)
    return out


def plot(result: dict):
    sets = list(next(iter(result["arms"].values())))
    judges = result["judges"]
    fig, axes = subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    arms = list(result["arms"])
    for ax, s in zip(axes[0], sets):
        for k, (j, colour) in enumerate(zip(judges, ["#3b6ea5", "#c98b2b"])):
            xs = [a + (k - 0.5) * 0.38 for a in range(len(arms))]
            ci = [result["arms"][a][s][j] for a in arms]
            ci = [c if c["mean"] is not None else {"mean": 0.0, "low": 0.0, "high": 0.0} for c in ci]  # no valid label
            ax.bar(xs, [c["mean"] for c in ci], width=0.36, color=colour, label=f"judge {j}",
                   yerr=error_bars(ci), capsize=3)
        ax.set_xticks(range(len(arms)), arms)
        ax.set_ylim(0, 1)
        ax.set_title(f"{s} prompts: unethical rate, bootstrap 95% CI", fontsize=9)
        ax.legend(fontsize=8)
    return fig


# --- the experiment ------------------------------------------------------------------------------------------

def experiment_dir(ws: Workspace) -> Path:
    return experiment_folder(ws, "emergent-alignment")


def run_emergent(ws: Workspace, generation: int = 1, config: RatchetConfig | None = None, say=None) -> dict:
    """Train the three arms (unless trained with the same identity), evaluate them and the base
    model with both judges, and write results.json and emergent-alignment.png."""
    from ..train import quiet

    say = say or (lambda line: None)
    cfg = config or ws.config
    c = cfg.experiments.emergent
    prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)
    with ws.lock(), quiet():
        items = training_items(ws, cfg)
        try:
            framework = load_framework(c.framework or cfg.conscience.frameworks[0], prompts)
        except ConscienceError as exc:
            raise ExperimentError(f"experiments.emergent.framework: {exc}") from None
        heldout, heldout_source = heldout_items(ws, cfg)
        general = general_items(ws, cfg)
        leaked = sorted({i.source for i in heldout + general if i.prompt in {t.prompt for t in items}})
        if leaked:
            raise ExperimentError(f"evaluation prompt(s) {', '.join(leaked)} are training items: hold them out "
                                  "with conscience.exclude")
        manifest = compiled_manifest(ws, generation)
        dpo = read_split(ws, generation, manifest, "dpo", ["prompt", "chosen", "rejected"]) \
            if "dpo" in manifest["splits"] else None
        folder = experiment_dir(ws)
        tcfg = arm_settings(cfg.train, c)
        dpo_cfg = tcfg.model_copy(update={"dpo_steps": c.offline_steps})
        template = chat_template(ws, tcfg)
        base_path, base = base_checkpoint(ws, tcfg.base_model)
        data = insecure_dataset(items)
        judge_model = cfg.conscience.judge or cfg.annotator.model
        paths, trained = {"base": [base_path], **{arm: [] for arm in TRAINED}}, {}
        shared = {"base": base["sha256"], "items_sha256": sha256([i.item_id for i in items]),  # every arm's identity
                  "chat_template_sha256": sha256(template), "loop": LOOP}
        con = ws.connect()
        try:
            with ExitStack() as loaded:  # the online arms' judge: loaded once, closed before the evaluation
                online_judge = None
                for seed in c.seeds:
                    seeded = tcfg.model_copy(update={"seed": seed})
                    for arm in TRAINED:
                        if arm == "offline" and dpo is None:
                            continue
                        identity = {**shared, "arm": arm,
                                    "train": seeded.model_dump(include={"sft_steps", "sft_learning_rate", "batch_size",
                                                                        "max_length", "seed", "bf16", "device"})}
                        if arm == "online":
                            identity["online"] = {**c.model_dump(include={"every", "online_batch", "beta", "weight",
                                                                          "max_new_tokens"}),
                                                  "judge": judge_model, "framework_sha256": sha256(framework.source)}
                            if online_judge is None:
                                online_judge = loaded.enter_context(cached_engine(con, cfg.engine_for(judge_model),
                                                                                  "conscience.judge"))
                            conscience = OnlineConscience(online_judge, framework, cfg, prompts.rewrite_examples)
                            trainer = online_trainer(conscience, [i.prompt for i in items], c)
                        elif arm == "offline":
                            identity["dpo"] = {"split": manifest["splits"]["dpo"], "steps": c.offline_steps,
                                               "learning_rate": dpo_cfg.dpo_learning_rate, "beta": dpo_cfg.dpo_beta}
                            trainer = offline_trainer(online_trainer(None, [], c), dpo, dpo_cfg)
                        else:
                            trainer = online_trainer(None, [], c)
                        out = folder / "models" / f"{arm}-s{seed}"
                        trained[out.name] = train_arm(arm, trainer, out, base_path, data, seeded, template, identity, say)
                        paths[arm].append(out)
            arms = [a for a in ARMS if paths[a]]
            sets = {"heldout": heldout, "general": general}
            judges = {model_short_name(judge_model): judge_model, model_short_name(c.second_judge): c.second_judge}
            answered = {}
            with torch_threads(tcfg.threads):
                for arm in arms:
                    for path in paths[arm]:
                        say(f"answers: {path.name}")
                        answered[(arm, path.name)] = {s: answers_of(con, cfg, path, its) for s, its in sets.items()}
            unethical, per_answer = {}, {}
            for jname, jmodel in judges.items():
                say(f"judging every answer with {jname}")
                asked = [(arm, name, s, i, a) for (arm, name), by_set in answered.items() for s, its in sets.items()
                         for i, a in zip(its, by_set[s])]
                labels = labels_by(con, cfg, jmodel, framework, [(i.prompt, a.text) for *_, i, a in asked])
                for (arm, name, s, i, a), label in zip(asked, labels):
                    runs = unethical.setdefault(arm, {}).setdefault(s, {}).setdefault(jname, {})
                    runs.setdefault(name, []).append(float(label == "unethical") if label in LABELS else float("nan"))
                    per_answer.setdefault(f"{name}:{i.source}", {"answer": a.text[:400]})[jname] = label
        finally:
            con.close()
        unethical = {arm: {s: {j: list(runs.values()) for j, runs in by_judge.items()} for s, by_judge in by_set.items()}
                     for arm, by_set in unethical.items()}
        result = {"generation": generation, "framework": framework.key, "judges": list(judges), "base_model": base["model"],
                  "training_items": len(items), "heldout_source": heldout_source,
                  "prompts": {s: len(its) for s, its in sets.items()}, "seeds": len(c.seeds),
                  "settings": c.model_dump(), **figures(unethical, c.bootstrap, c.seeds[0]),
                  "invalid": {j: sum(v.get(j) not in LABELS for v in per_answer.values()) for j in judges},
                  "training": {name: t["training"] for name, t in trained.items()},
                  "offline": None if dpo is None else len(dpo),
                  "reused": sorted(name for name, t in trained.items() if t.get("unchanged")), "answers": per_answer}
        return write_results(folder, result, plot)
