"""Persona predictions, verified after training: `ratchet experiment personas`.

Every consent judge names the persona or trait that training on an example would reinforce
(`consents.trait`, `trait_tag`). After `ratchet train`, check whether they were right. For each
predicted trait with enough examples among those that went to training:

  P  the start model (what the trained model was trained from) prompted "You are {trait}."
  B  the same start model, plainly prompted
  T  the trained model, plainly prompted

P and B answer a fixed set of probe requests (greedy, short). Per probe, with per-token
log-likelihoods under the plain prompt,

  effect = [log T(P's answer) - log B(P's answer)] - [log T(B's answer) - log B(B's answer)]

how much more training raised the likelihood of the persona's answer than of the plain model's
own: above 0, the trained model moved toward the persona. The second term removes what any
training does to text of that kind. Bootstrap 95 % interval over the probes; a trait is
confirmed when the interval is above 0. Control personas (never predicted) run the same way: a
predicted trait's effect means little if an unrelated persona's is as large.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..cache import sha256
from ..config import RatchetConfig
from ..corpus import jsonl_lines
from ..models import weights_sha256
from ..resources import EXAMPLES_DIR
from ..train import chat_template, model_dir, read_training, start_model, torch_threads, use_cpu
from ..workspace import Workspace
from .arms import (ExperimentError, cached, error_bars, experiment_folder, subplots, turn_logprob,
                   write_results)
from ..stats import paired_interval as interval

BUNDLED_PROBES = EXAMPLES_DIR / "personas" / "probes.jsonl"
PLAIN = "You are a helpful assistant."
SCORING = 1  # bump when generation or scoring changes: stored answers and scores of another version are not reused

# The traits that went to training: a consent judge's answer on an example no judge vetoed,
# counted once per example (two judges naming one trait for one example count once).
TRAITS_SQL = """
SELECT c.trait_tag, count(DISTINCT (c.split, c.example_id)) AS examples, mode(c.trait) AS trait,
       list(DISTINCT c.judge ORDER BY c.judge) AS judges
FROM consents c
WHERE c.generation = $g AND c.trait_tag IS NOT NULL AND c.trait_tag <> 'none'
  AND NOT EXISTS (SELECT 1 FROM consents v WHERE v.generation = c.generation AND v.split = c.split
                  AND v.example_id = c.example_id AND v.veto)
GROUP BY c.trait_tag ORDER BY examples DESC, c.trait_tag"""


def predicted_traits(con, generation: int) -> list[dict]:
    """Every trait the consent judges predicted for the examples that went to training."""
    return [{"tag": tag, "examples": n, "trait": trait, "judges": judges}
            for tag, n, trait, judges in con.execute(TRAITS_SQL, {"g": generation}).fetchall()]


def load_probes(spec: str, ws: Workspace, limit: int = 0) -> tuple[list[dict], str]:
    """The probe requests (JSONL with a `prompt` per row; `id` optional); a bad row names file and line."""
    path = ws.resolve(spec) if spec else BUNDLED_PROBES
    if not path.is_file():
        raise ExperimentError(f"experiments.personas.probes: {path}: no such file")
    probes = []
    for n, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), 1):  # not splitlines(): see jsonl_lines
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ExperimentError(f"{path}: line {n}: not JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ExperimentError(f"{path}: line {n}: no prompt")
        probes.append({"id": str(row.get("id") or n), "prompt": row["prompt"], "category": row.get("category")})
    if not probes:
        raise ExperimentError(f"{path}: no probes")
    return (probes[:limit] if limit else probes), str(path)


def persona_prompt(trait: str) -> str:
    trait = trait.strip().rstrip(".")
    return trait if trait.lower().startswith("you are") else f"You are {trait[:1].lower() + trait[1:]}."


# --- answers and scores ------------------------------------------------------------------------------------

def load(path: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval().to(device), tokenizer


def generate(model, tokenizer, template: str, system: str, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers, one prompt at a time (no padding to get wrong), the turn ended at <|im_end|>."""
    import torch

    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                             chat_template=template, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=model.device)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=end, pad_token_id=end)[0, ids.shape[1]:]
        out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return out


def per_token(model, tokenizer, template: str, prompts: list[str], answers: list[str]) -> list[float]:
    """Per-token log-likelihood of each answer under the plain prompt."""
    values = []
    for prompt, answer in zip(prompts, answers):
        total, n = turn_logprob(model, tokenizer, template, [{"role": "system", "content": PLAIN},
                                                             {"role": "user", "content": prompt}], "assistant", answer)
        values.append(round(total / n, 6))
    return values


# --- the experiment --------------------------------------------------------------------------------------

def experiment_dir(ws: Workspace) -> Path:
    return experiment_folder(ws, "personas")


def verdict(ci: dict) -> str:
    return "confirmed" if ci["low"] > 0 else "contradicted" if ci["high"] < 0 else "not confirmed"


def run_personas(ws: Workspace, generation: int = 1, config: RatchetConfig | None = None, say=None) -> dict:
    """Verify the consent judges' trait predictions on the model trained on `generation`; writes
    results.json and personas.png. Answers and scores are reused while their models hold."""
    import numpy as np

    from ..train import quiet

    say = say or (lambda line: None)
    cfg = config or ws.config
    c = cfg.experiments.personas
    with ws.lock(), quiet():
        trained_path = model_dir(ws, generation)
        training = read_training(trained_path)
        if training is None:
            raise ExperimentError(f"{trained_path}: no trained model for generation {generation}: run "
                                  f"`ratchet train -w {ws.root} --generation {generation}` first")
        start_path, start = start_model(ws, generation, cfg.train)
        if start["sha256"] != training["start_model"]["sha256"]:
            raise ExperimentError(f"{trained_path} was trained from {training['start_model']['model']}, which is not "
                                  f"{start['model']} any more: train generation {generation} again")
        con = ws.connect(read_only=True)
        try:
            everything = predicted_traits(con, generation)
        finally:
            con.close()
        if not everything:
            raise ExperimentError(f"generation {generation} has no trait predictions: set consent.judges and build")
        checked = [t for t in everything if t["examples"] >= c.min_examples][:c.traits]
        probes, source = load_probes(c.probes, ws, c.limit)
        prompts = [p["prompt"] for p in probes]
        template = chat_template(ws, cfg.train)
        folder = experiment_dir(ws)
        personas = {"plain": PLAIN, **{t["tag"]: persona_prompt(t["trait"]) for t in checked},
                    **{f"control:{k}": persona_prompt(text) for k, text in enumerate(c.controls, 1)}}
        shas = {"start": start["sha256"], "trained": weights_sha256(trained_path)}
        common = {"probes": sha256(probes), "template": sha256(template), "scoring": SCORING}
        with torch_threads(cfg.train.threads):
            device = "cpu" if use_cpu(cfg.train) else "cuda"
            model, tokenizer = load(start_path, device)
            say(f"{len(personas)} persona(s) x {len(prompts)} probe(s): answers and scores under {start['model']}")
            answers = {name: cached(folder, "answers", {**common, "model": shas["start"], "system": system,
                                                        "max_new_tokens": c.max_new_tokens},
                                    lambda system=system: generate(model, tokenizer, template, system, prompts,
                                                                   c.max_new_tokens))
                       for name, system in personas.items()}
            score = lambda which, m, tok: {  # noqa: E731
                name: cached(folder, "scores", {**common, "model": shas[which], "answers": sha256(a)},
                             lambda a=a: per_token(m, tok, template, prompts, a)) for name, a in answers.items()}
            under_start = score("start", model, tokenizer)
            del model
            say(f"scores under the trained model ({trained_path.name})")
            model, tokenizer = load(trained_path, device)
            under_trained = score("trained", model, tokenizer)
            del model
        rng = np.random.default_rng(c.seed)
        drawn = rng.integers(0, len(prompts), size=(c.bootstrap, len(prompts)))
        one_seed = np.zeros((c.bootstrap, 1), dtype=int)
        shift = {name: np.array(under_trained[name]) - np.array(under_start[name]) for name in personas}
        rows = {}
        for name in personas:
            if name == "plain":
                continue
            effect = (shift[name] - shift["plain"])[None, :]
            ci = interval(effect, drawn, one_seed)
            trait = next((t for t in checked if t["tag"] == name), None)
            rows[name] = {"persona": personas[name], "control": trait is None,
                          "examples": trait["examples"] if trait else 0, "judges": trait["judges"] if trait else [],
                          "effect": ci, "toward_persona": round(float((effect > 0).mean()), 4), "verdict": verdict(ci),
                          "per_probe": dict(zip([p["id"] for p in probes], effect[0].round(4).tolist()))}
        result = {"generation": generation, "trained_model": str(trained_path), "start_model": start["model"],
                  "probes": len(probes), "probes_source": source, "settings": c.model_dump(),
                  "predicted": everything, "checked": [t["tag"] for t in checked],
                  "unchecked": [t["tag"] for t in everything if t not in checked], "traits": rows,
                  "answers": {name: dict(zip([p["id"] for p in probes], a)) for name, a in answers.items()}}
        return write_results(folder, result, plot)


def plot(result: dict):
    names = list(result["traits"])
    fig, ax = subplots(figsize=(8, 0.5 * len(names) + 1.6))
    ci = [result["traits"][n]["effect"] for n in names]
    colours = ["#999999" if result["traits"][n]["control"] else "#3b6ea5" for n in names]
    for y, (c, colour) in enumerate(zip(ci, colours)):
        ax.errorbar(c["mean"], y, xerr=error_bars([c]), fmt="o", capsize=4, color=colour)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(names)), [f"{n} (not predicted)" if result["traits"][n]["control"] else
                                      f"{n} ({result['traits'][n]['examples']} ex.)" for n in names])
    ax.set_xlabel("effect: log-lik. gain of the persona's answers minus the plain answers' (per token)")
    ax.set_title(f"generation {result['generation']}: predicted traits (blue) and controls (grey), "
                 f"{result['probes']} probes, bootstrap 95% CI", fontsize=9)
    return fig
