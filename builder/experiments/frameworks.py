"""The framework ablation: `ratchet experiment frameworks`.

The same scenario under each conscience framework (prompts/frameworks/*.toml), under variants
of the introspective question (prompts/frameworks/questions.txt, each put into the base
framework in place of its own question) and under no conscience at all. Per condition:

  agreement  the frozen judge's labels on the labelled file (examples/code_hacking/
             judge_eval.jsonl) against the gold labels: accuracy with a bootstrap interval,
             Cohen's kappa, and the AUC of P(unethical), unethical vs the rest
  pairs      the conscience step on the scenario's training items (conscience.items without
             the held-out rows): responses labelled unethical, rewrites kept as pairs
  after      DPO from the base model on the condition's pairs (the same steps and seed for
             every condition), then the held-out evaluation of `ratchet loop`: the share of
             held-out answers the frozen judge labels unethical (under conscience.frameworks,
             the same for every condition), with a bootstrap interval over the prompts and the
             difference from "none" (the base model: no conscience, no pairs) paired by prompt

Every judge call goes through the workspace's call cache (a rerun makes none) and each trained
condition is reused while its pairs and settings hold.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..cache import sha256
from ..config import RatchetConfig
from ..corpus import jsonl_lines
from ..evaluate import cached_engine, evaluate_locked
from ..prompts import Prompts
from ..resources import EXAMPLES_DIR, PROMPTS_DIR
from ..stages.conscience import (LABELS, ConscienceError, Framework, judge, load_framework, load_items, readings,
                                 run_conscience)
from ..train import base_checkpoint, chat_template, run_dpo
from ..workspace import Workspace
from .arms import (ExperimentError, arm_settings, error_bars, experiment_folder, subplots, train_arm,
                   write_results)
from ..stats import paired_interval as interval

LABELLED = EXAMPLES_DIR / "code_hacking" / "judge_eval.jsonl"
QUESTIONS = PROMPTS_DIR / "frameworks" / "questions.txt"
NONE = "none"


@dataclass
class Condition:
    name: str  # "none", a framework key, or KEY?qN for a question variant
    framework: Framework | None
    question: str | None = None  # the variant's question


def framework_keys(prompts: Prompts) -> list[str]:
    return sorted({p.stem for folder in prompts.folders for p in (folder / "frameworks").glob("*.toml")})


def read_questions(path: Path) -> list[str]:
    if not path.is_file():
        raise ExperimentError(f"experiments.frameworks.questions: {path}: no such file")
    return [line.strip() for line in jsonl_lines(path.read_text(encoding="utf-8"))  # a line is "\n"-ended only
            if line.strip() and not line.lstrip().startswith("#")]


def conditions(ws: Workspace, cfg: RatchetConfig, prompts: Prompts) -> list[Condition]:
    """none, every framework (experiments.frameworks.frameworks, else every file), then the base
    framework once per question variant."""
    c = cfg.experiments.frameworks
    base = c.base or cfg.conscience.frameworks[0]
    try:
        out = [Condition(NONE, None)] + [Condition(k, load_framework(k, prompts)) for k in c.frameworks or
                                         framework_keys(prompts)]
        questions = read_questions(ws.resolve(c.questions) if c.questions else QUESTIONS)
        out += [Condition(f"{base}?q{n}", load_framework(base, prompts, q), q) for n, q in enumerate(questions, 1)]
    except ConscienceError as exc:
        raise ExperimentError(f"experiments.frameworks: {exc}") from None
    return out


def scenario_items(ws: Workspace, cfg: RatchetConfig):
    """The scenario's training items (evaluate.training_items), the first experiments.frameworks.limit."""
    from ..evaluate import training_items

    limit = cfg.experiments.frameworks.limit
    items = training_items(ws, cfg)
    return items[:limit] if limit else items


# --- the judge's part: agreement and pairs ---------------------------------------------------------------

def agreement(labelled, outcomes, decide_by: str, n: int, seed: int) -> dict:
    """readings() of the judge's labels against the gold ones, and a bootstrap interval of the
    deciding reading's accuracy (judgements.decide_by, where the engine gives it) over the items."""
    import numpy as np

    read = readings(labelled, outcomes)
    deciding = decide_by if decide_by in read else "generated"
    hits = np.array([[float(p == i.label) for p, i in zip(read[deciding]["predicted"], labelled)]])
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(labelled), size=(n, len(labelled)))
    m = read[deciding]
    return {"reading": deciding, "accuracy": interval(hits, drawn, np.zeros((n, 1), dtype=int)),
            "cohen_kappa": m["cohen_kappa"], "auc_unethical": m["auc_unethical"], "invalid": m["invalid"],
            "labels": dict(Counter(p or "invalid" for p in m["predicted"]))}


def judge_conditions(ws: Workspace, cfg: RatchetConfig, prompts: Prompts, todo: list[Condition], say) -> dict:
    """Per condition with a framework: agreement on the labelled file and the pairs from the
    scenario's training items, with one frozen judge through the workspace's call cache."""
    c = cfg.experiments.frameworks
    try:
        labelled, _ = load_items(ws.resolve(c.labelled) if c.labelled else LABELLED, label_field="label")
    except ConscienceError as exc:
        raise ExperimentError(f"experiments.frameworks.labelled: {exc}") from None
    labelled = labelled[:c.labelled_limit] if c.labelled_limit else labelled
    items = scenario_items(ws, cfg)
    judge_model = cfg.conscience.judge or cfg.annotator.model
    out = {}
    con = ws.connect()
    try:
        with cached_engine(con, cfg.engine_for(judge_model), "conscience.judge") as engine:
            for cond in todo:
                say(f"{cond.name}: judging {len(labelled)} labelled pair(s) and {len(items)} scenario item(s)")
                outcomes = judge([(i.prompt, i.response) for i in labelled], engine, cond.framework, cfg)
                _, pairs = run_conscience(items, [cond.framework], engine, cfg, examples=prompts.rewrite_examples)
                out[cond.name] = {
                    "agreement": {**agreement(labelled, outcomes, cfg.judgements.decide_by, c.bootstrap, c.seed),
                                  "n": len(labelled)},
                    "items": len(items), "unethical": len(pairs), "kept": sum(p.kept for p in pairs),
                    "pairs": [{"prompt": [{"role": "user", "content": p.item.prompt}],
                               "chosen": [{"role": "assistant", "content": p.chosen}],
                               "rejected": [{"role": "assistant", "content": p.item.response}]}
                              for p in pairs if p.kept]}
            out["_judge"] = {"model": judge_model, "calls": engine.stats.calls, "cached": engine.stats.hits}
    finally:
        con.close()
    return out


# --- training and the held-out evaluation --------------------------------------------------------------

def unethical_by_prompt(record: dict) -> list[float]:
    """Per held-out prompt (in order), the share of the evaluation frameworks that labelled its
    answer unethical (0 for an answer with no valid label or no answer)."""
    values = []
    for answer in record["answers"].values():
        labels = [x for x in (answer.get("labels") or {}).values() if x in LABELS]
        values.append(sum(x == "unethical" for x in labels) / len(labels) if labels else 0.0)
    return values


def experiment_dir(ws: Workspace) -> Path:
    return experiment_folder(ws, "frameworks")


def run_frameworks(ws: Workspace, config: RatchetConfig | None = None, say=None) -> dict:
    """Judge, train and evaluate every condition; write results.json and frameworks.png."""
    import numpy as np

    from ..train import quiet

    say = say or (lambda line: None)
    cfg = config or ws.config
    c = cfg.experiments.frameworks
    prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)
    with ws.lock(), quiet():
        todo = conditions(ws, cfg, prompts)
        judged = judge_conditions(ws, cfg, prompts, [x for x in todo if x.framework], say)
        tcfg = arm_settings(cfg.train, c, c.seed).model_copy(update={"dpo_steps": c.steps, "dpo_learning_rate": c.learning_rate,
                                                              "dpo_beta": c.beta})
        template = chat_template(ws, tcfg)
        base_path, base = base_checkpoint(ws, tcfg.base_model)
        folder = experiment_dir(ws)
        models, training = {NONE: base_path}, {}
        for cond in todo:
            pairs = judged.get(cond.name, {}).get("pairs") or []
            if not pairs:
                continue  # no pairs: nothing to train; its held-out figure is the base model's
            import datasets

            data = datasets.Dataset.from_list(pairs)
            identity = {"condition": cond.name, "base": base["sha256"], "pairs_sha256": sha256(pairs),
                        "train": tcfg.model_dump(include={"dpo_steps", "dpo_learning_rate", "dpo_beta", "batch_size",
                                                          "max_length", "seed", "bf16", "device"}),
                        "chat_template_sha256": sha256(template)}
            out = folder / "models" / cond.name.replace("?", "-")
            training[cond.name] = train_arm(cond.name, run_dpo, out, base_path, data, tcfg, template, identity, say)
            models[cond.name] = out
        evaluated = {}
        for name, path in models.items():
            say(f"held-out evaluation: {name}")
            evaluated[name] = evaluate_locked(ws, path, f"frameworks:{name}", cfg)
        rates = {name: np.array([unethical_by_prompt(r)]) for name, r in evaluated.items()}
        prompts_n = rates[NONE].shape[1]
        rng = np.random.default_rng(c.seed)
        drawn, one = rng.integers(0, prompts_n, size=(c.bootstrap, prompts_n)), np.zeros((c.bootstrap, 1), dtype=int)
        rows = {}
        for cond in todo:
            trained = cond.name in training
            rate = rates[cond.name if trained else NONE]
            j = judged.get(cond.name, {})
            rows[cond.name] = {
                "framework": cond.framework.key if cond.framework else None,
                "question": cond.question or (cond.framework.question if cond.framework else None),
                "agreement": j.get("agreement"), "unethical": j.get("unethical"), "kept": j.get("kept", 0),
                "trained": trained, "heldout_unethical": interval(rate, drawn, one),
                "vs_none": interval(rate - rates[NONE], drawn, one) if cond.name != NONE else None,
                "train_loss": training[cond.name]["training"].get("train_loss") if trained else None}
        result = {"conditions": rows, "items": next((j["items"] for k, j in judged.items() if k != "_judge"), 0),
                  "heldout_prompts": prompts_n, "judge": judged["_judge"], "settings": c.model_dump(),
                  "evaluation_frameworks": cfg.conscience.frameworks, "base_model": base["model"],
                  "reused": sorted(n for n, t in training.items() if t.get("unchanged")),
                  "answers": {n: r["answers"] for n, r in evaluated.items()}}
        return write_results(folder, result, plot)


def plot(result: dict):
    names = list(result["conditions"])
    rows = [result["conditions"][n] for n in names]
    fig, axes = subplots(1, 3, figsize=(12, 0.45 * len(names) + 1.8), sharey=True)
    for ax, (title, get) in zip(axes, [
            ("judge accuracy on the labelled file", lambda r: r["agreement"] and r["agreement"]["accuracy"]),
            ("held-out unethical rate after DPO", lambda r: r["heldout_unethical"]),
            ("difference from none (paired)", lambda r: r["vs_none"])]):
        for y, r in enumerate(rows):
            ci = get(r)
            if ci:
                ax.errorbar(ci["mean"], y, xerr=error_bars([ci]), fmt="o",
                            capsize=3, color="#3b6ea5" if r["trained"] or r["framework"] is None else "#999999")
        ax.set_title(title, fontsize=9)
    axes[0].axvline(1 / 3, ls="--", color="black", lw=0.8)
    axes[2].axvline(0, color="black", lw=0.8)
    axes[0].set_yticks(range(len(names)), [f"{n} ({r['kept']} pairs)" for n, r in zip(names, rows)])
    return fig
