"""The workspace config: one `ratchet.toml`, validated with pydantic.

Every section forbids unknown keys, so a typo is an error that names the key and the file
instead of a setting silently ignored.
"""
from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Literal, get_args

from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from .backends.base import EngineConfig

CONFIG_NAME = "ratchet.toml"


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class CorpusConfig(Section):
    path: str = Field("corpus", description="File or folder to ingest, relative to the workspace.")
    text_field: str = Field("text", description="Column holding the text in JSONL, parquet and datasets inputs.")
    chunk_tokens: int = Field(384, ge=16, le=8192, description="Token budget of one passage.")
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="An empty, binary or non-UTF-8 file: stop with an error, or skip it and report it.")


def engine_section(value):
    """[annotator] (or any engine table) as its engine's config class, picked by `backend`."""
    from .backends import registry

    return registry.parse(value)


class SamplingConfig(Section):
    temperature: float = Field(0.2, ge=0.0, le=2.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    repeat_penalty: float = Field(1.1, ge=1.0, le=2.0, description="Penalty on repeated tokens; 1.0 turns it off.")
    max_tokens: int = Field(512, ge=8, description="Output budget; the schema is bounded to fit inside it.")
    seed: int = Field(1234, ge=0, description="Base seed; each retry uses another seed.")


class AnnotateConfig(Section):
    retries: int = Field(2, ge=0, le=10, description="Extra attempts, with another seed, after an invalid output.")
    at_length_bound: Literal["trim", "retry"] = Field(
        "trim", description="A string that reached its schema's maxLength (the grammar stops it there, mid-word): "
        "trim = cut it back to its last complete sentence or word and keep the answer (counted as trimmed); "
        "retry = treat the answer as truncated: retry with another seed, then reject it.")
    datamark: Literal["line", "word", "none"] = Field(
        "line", description="How the passage is marked as data in the prompt (spotlighting): line, word or none.")
    prompts: str = Field("", description="A folder of prompt templates that overrides the built-in prompts/.")
    gates: bool = Field(True, description="The faithfulness gates (builder/faithfulness.py, docs/faithfulness.md): "
                        "evidence restricted to the passage's own spans, claims checked against their evidence, "
                        "echoes of a prompt example and garbled words vetoed, and an answer that carries out an "
                        "order its passage gives vetoed (builder/injection.py, docs/security.md); a veto is retried "
                        "like an invalid answer. false: the free schema and no check, as before the gates (for "
                        "comparison).")
    claim_judge: str = Field("", description="With the gates: a model asked, claim by claim, whether the passage "
                             "supports each claim the rules kept (the grounding judge of builder/judges.py); a claim "
                             "it finds unsupported is dropped, and an annotation left without a claim is rejected. A "
                             "GGUF path or bundled:NAME (the best measured: bundled:qwen2.5-coder-1.5b); empty, the "
                             "default: the rules alone, which leave it little to do (3 unsupported among the 51 "
                             "labelled claims they keep) for about 3 s a claim (docs/judges.md).")
    claim_threshold: float = Field(0.5, gt=0, le=1, description="The claim judge drops a claim whose calibrated "
                                   "P(unsupported) is at least this.")
    note_judge: str = Field("bundled:qwen2.5-coder-1.5b", description="With the gates: a model asked, sentence by "
                            "sentence, whether the passage says what each note (weak reasoning, uncertainties, "
                            "ethical stakes) and the reflection the rules kept say; a sentence it finds unsupported "
                            "is cut. On 345 note and prose sentences of four audited demos, Qwen2.5-Coder-1.5B's AUC "
                            "on what the rules keep is 0.89 (notes) and 0.79 (prose), and it takes the reflections "
                            "right in every sentence from 34 to 56 of 81 (docs/faithfulness.md). About 2 s a "
                            "sentence on 2 cores; empty: the rules alone.")
    note_threshold: float = Field(0.5, gt=0, le=1, description="The note judge cuts a sentence whose calibrated "
                                  "P(unsupported) is at least this.")
    prose_threshold: float = Field(0.5, gt=0, le=1, description="The note judge cuts a sentence of the reflection "
                                   "whose calibrated P(unsupported) is at least this (a sentence given back as the "
                                   "passage's is not asked); a reflection left without a sentence is rebuilt from its "
                                   "kept claims' quotes, each said as the passage's. 1: the prose is kept as the rules "
                                   "left it (docs/faithfulness.md).")
    refused_reflection: Literal["rebuild", "ask", "retry"] = Field(
        "rebuild", description="With the gates: what happens to an answer whose claims they verify but whose "
        "reflection they refuse whole (no sentence its passage bears out). rebuild: the answer is kept and its "
        "reflection rebuilt from its claims' quotes, each said as the passage's (no model call; right, and thin). "
        "ask: the answer is kept and its writer asked for the reflection alone again, up to rewrite_reflection "
        "times, then rebuilt (read by a person on 11 such answers, the prose the note judge kept was right in 3 of "
        "6). retry: the answer is vetoed and retried whole, as before 2026-12-08 (docs/faithfulness.md).")
    rewrite_reflection: int = Field(2, ge=1, le=10, description="With refused_reflection = ask: how many times the "
                                    "writer is asked for the reflection alone before it is rebuilt.")
    best_of: int = Field(1, ge=1, le=8, description="Candidates each annotating member samples per passage (a "
                         "member's own best_of overrides it). With the gates, the one kept has the most claims they "
                         "verify; a tie goes to fewer words the passage does not bear out, then to the earlier "
                         "sample. The first candidate is the request of best_of = 1 (same cache key); the others "
                         "draw other seeds at candidate_temperature (docs/faithfulness.md: what N buys).")
    candidate_temperature: float = Field(0.8, ge=0.0, le=2.0, description="Sampling temperature of every candidate "
                                         "after the first (at least the member's own), so that they differ.")


class AuditConfig(Section):
    rate: float = Field(0.25, ge=0.0, le=1.0, description="Share of accepted annotations chosen (secretly) for audit.")
    # Empty by default: on 67 kept reflections a person audited, no bundled model tells a faithful one
    # from an unfaithful one (SmolLM2 AUC 0.33, Qwen2.5-Coder-0.5B 0.52, 1.5B 0.55: bench/auditors.py).
    auditor: str = Field("", description="Model auditor (GGUF path or bundled:NAME); empty: people only (no bundled "
                         "model earns it: docs/judges.md#the-model-auditor-against-a-person).")
    persona: str = Field("auditor", description="The auditor's perspective; its prompt is prompts/audit.system.jinja.")
    max_tokens: int = Field(192, ge=16, description="Output budget of one audit verdict.")
    vote_weights: Literal["validity", "audits", "human", "prior"] = Field(
        "validity", description="What weighs a critic's votes. validity: what it has shown on claims a person "
        "labelled (`ratchet validity`; the bundled critics' measurements ship in prompts/critic_validity.jsonl), "
        "2 x the lower end of its AUC's 95% interval - 1, so a critic at chance weighs 0 and is not asked; people's "
        "critique audits join the measurement as they come; never measured: 0.5. human: people's critique audits "
        "only (every vote 0.5 until someone reviews critiques); audits: every auditor's (the model auditor's too: "
        "the bundled one cannot tell a right critique from a wrong one, bench/validity.py); prior: every vote 0.5.")


ROLES = ("annotate", "critique")


class MemberConfig(Section):
    """One ensemble member: a model (substrate) and a persona (perspective). Engine keys left
    out are taken from [annotator]. `kind = "verifier"` is a member that is no model: the
    grounding verifier (builder/verifier.py), which critiques every annotation."""
    kind: Literal["model", "verifier"] = Field("model", description="model: a language model; verifier: the grounding "
                                               "verifier (no model; critiques every annotation, on top of the k critics).")
    name: str = Field("", description="Unique name; default MODEL-PERSONA (e.g. smollm2-empiricist), or grounding.")
    model: str | None = Field(None, description="As annotator.model (a GGUF path, bundled:NAME, a served model, a "
                              "checkpoint folder); default annotator.model.")
    backend: str | None = Field(None, description="Engine (see `ratchet engines`); default annotator.backend.")
    base_url: str | None = Field(None, description="openai: this member's server; default annotator.base_url.")
    persona: str = Field("empiricist", description="A file prompts/personas/PERSONA.txt (or in annotate.prompts).")
    roles: list[Literal["annotate", "critique"]] = Field(
        list(ROLES), min_length=1, description="What the member does: annotate, critique, or both.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Sampling temperature; default sampling.temperature.")
    best_of: int | None = Field(None, ge=1, le=8, description="Candidates this member samples per passage, the "
                                "best kept; default annotate.best_of.")
    few_shot: bool = Field(True, description="Show this member the prompt's few-shot annotation examples "
                           "(annotate.examples.jsonl). false: the instructions and the grammar alone (a model that "
                           "copies the examples' content into its reflections: docs/faithfulness.md).")

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        from .backends import registry

        if value is not None:
            registry.engine(value)  # an unknown name is an error with a suggestion
        return value

    @model_validator(mode="after")
    def _a_verifier_only_critiques(self):
        if self.kind == "verifier":
            if "roles" in self.model_fields_set and "annotate" in self.roles:
                raise ValueError("a verifier member critiques only: roles = [\"critique\"]")
            self.roles = ["critique"]
        return self

    @property
    def display_name(self) -> str:
        if self.kind == "verifier":
            return self.name or "grounding"
        return self.name or f"{model_short_name(self.model or '?')}-{self.persona}"

    def engine(self, defaults: EngineConfig) -> EngineConfig:
        """This member's engine: [annotator]'s keys that its engine has, the member's own on top."""
        from .backends import registry

        return registry.derive(defaults, model=self.model, backend=self.backend, base_url=self.base_url)


def default_members() -> list[MemberConfig]:
    """The writer that gave the most reflections passing the faithfulness gates per minute on 2
    cores (Qwen2.5-Coder-0.5B, bench/annotators.py: docs/faithfulness.md), critiqued by two
    other families, and the grounding verifier."""
    return [MemberConfig(model="bundled:qwen2.5-coder-0.5b", persona="empiricist", roles=["annotate"], few_shot=False),
            MemberConfig(model="bundled:gemma3", persona="skeptic", roles=["critique"]),
            MemberConfig(persona="care-ethicist", roles=["critique"]),  # annotator.model: bundled:smollm2
            MemberConfig(kind="verifier", name="grounding")]


class EnsembleConfig(Section):
    members: list[MemberConfig] = Field(default_factory=default_members, min_length=1)
    k: int = Field(2, ge=0, description="Critics per annotation, chosen to differ from its author: another "
                   "family first, then another persona. 0 keeps every valid annotation unscrutinized.")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Lowest convergence score a kept annotation may have.")
    critic_max_tokens: int = Field(160, ge=16, description="Output budget of one critique.")

    def check(self, default_model: str) -> None:
        for m in self.members:
            if m.kind == "model":
                m.model = m.model or default_model
        names = [m.display_name for m in self.members]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"ensemble.members: names must be unique; {', '.join(twice)} appears more than once (set name = ...)")
        if not any("annotate" in m.roles for m in self.members):
            raise ValueError("ensemble.members: no member has the role 'annotate'")
        critics = [m for m in self.members if "critique" in m.roles and m.kind == "model"]  # verifiers are extra
        for m in self.members:
            if "annotate" in m.roles:
                others = [c for c in critics if c.display_name != m.display_name]
                if self.k > len(others):
                    raise ValueError(f"ensemble.k = {self.k} but {m.display_name} has only {len(others)} other critic(s) in the "
                                     f"ensemble; lower k or add members with role 'critique'")


class ConscienceConfig(Section):
    """Prompt/response items judged by a frozen judge; unethical responses become DPO pairs."""
    items: str = Field("", description="Prompt/response items (JSONL, parquet or a local datasets path), relative to "
                       "the workspace; empty: no conscience step.")
    prompt_field: str = Field("prompt", description="Column holding the request.")
    response_field: str = Field("response", description="Column holding the response to judge.")
    exclude: dict[str, str] = Field(default_factory=dict, description="Leave out rows whose column has this value, "
                                    "e.g. {split = \"heldout\"} keeps evaluation prompts out of training.")
    frameworks: list[str] = Field(["three-laws"], min_length=1, description="Files in prompts/frameworks/ (without .toml).")
    judge: str = Field("", description="The frozen judge (a GGUF path or bundled:NAME); empty: annotator.model, "
                       "the generation-0 model. Never the model being trained.")
    max_tokens: int = Field(160, ge=16, description="Output budget of one judgement.")
    rewrite_max_tokens: int = Field(320, ge=32, description="Output budget of one rewrite.")


class ConsentConfig(Section):
    """Frozen checkpoints that must consent to every example bound for a training split."""
    judges: list[str] = Field(default_factory=list, description="Frozen checkpoints (GGUF paths or bundled:NAME); "
                              "empty: no consent gate. A veto from any one excludes the example.")
    on_invalid: Literal["veto", "abstain"] = Field(
        "veto", description="A judge with no valid answer after every retry: veto (consent not given) or abstain.")
    veto_threshold: float = Field(0.5, ge=0.0, le=1.0, description="A judge vetoes an example when its P(no) "
                                  "(judgements.decide_by) is above this.")
    max_tokens: int = Field(192, ge=16, description="Output budget of one consent decision.")
    explored: list[Literal["vetoed", "rejected"]] = Field(
        default_factory=list, description="Keep explored trajectories in an `explored` split, each response a turn "
        "spoken by `Naive_Explorer` (not `assistant`, not `internal`), so that training predicts them without "
        "producing them: vetoed = the examples a consent judge vetoed (every drift event under the default "
        "veto_threshold); rejected = the responses the conscience judge labelled unethical (the dpo pairs' "
        "rejected side). Empty: no explored split.")

    @model_validator(mode="after")
    def _unique_judges(self):
        names = [model_short_name(j) for j in self.judges]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"consent.judges: {', '.join(twice)} is named twice (judges are known by file name)")
        return self


class RatchetRuleConfig(Section):
    """Generation N+1 re-annotates generation N's passages; a fixed panel decides what replaces what."""
    panel: list[str] = Field(default_factory=list, description="Ensemble members (by name) that form the fixed "
                             "reference panel, frozen by the workspace's first generation; empty: every critic then.")
    reseed: bool = Field(True, description="Generation N annotates with sampling.seed + 1000 * (N - 1), so the same "
                         "models draw new reflections each generation; false: the same seed (and cached answers).")
    pairwise: bool = Field(True, description="The panel also compares each candidate with its parent head to head, "
                           "in both orders; a candidate replaces its parent only when the panel prefers it by more "
                           "than 0.5 + margin (and scores at least as well). false: only when it scores higher.")
    margin: float = Field(0.05, ge=0.0, lt=0.5, description="How far above 0.5 the panel's pairwise preference must be.")


class TrainConfig(Section):
    """The bundled TRL trainer (`ratchet train`, `ratchet loop`): SFT on a generation's sft split (loss on the
    `internal` reflections), then DPO on its dpo split. The defaults fit a CPU (a few steps, short sequences);
    for a GPU run raise the steps, batch_size and max_length and set bf16 = true (docs/training-and-loop.md)."""
    base_model: str = Field("bundled:smollm2", description="The model generation 1 trains from: a GGUF path or "
                            "bundled:NAME (dequantized once into models/base/) or a local transformers checkpoint "
                            "folder. Generation N > 1 trains from models/gen-(N-1) when it exists.")
    chat_template: str = Field("", description="A jinja chat template file with {% generation %} markers around the "
                               "`internal` turns; empty: the project's prompts/chat_template.jinja (ChatML).")
    sft_steps: int = Field(4, ge=1, description="SFT optimizer steps (max_steps) on the sft split.")
    dpo_steps: int = Field(2, ge=0, description="DPO optimizer steps on the dpo split; 0 skips DPO.")
    batch_size: int = Field(2, ge=1, description="Examples per device per step (per_device_train_batch_size).")
    grad_accumulation: int = Field(1, ge=1, description="Steps whose gradients are summed before an update "
                                   "(gradient_accumulation_steps).")
    sft_learning_rate: float = Field(2e-5, gt=0.0, description="SFT learning rate.")
    dpo_learning_rate: float = Field(5e-6, gt=0.0, description="DPO learning rate.")
    max_length: int = Field(512, ge=32, description="Tokens per training sequence; longer ones are truncated.")
    dpo_beta: float = Field(0.1, gt=0.0, description="DPO beta: how far the policy may move from the reference.")
    bf16: bool = Field(False, description="Train in bfloat16 mixed precision (a GPU that supports it).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less "
                                         "memory, more time.")
    use_lora: bool = Field(False, description="Train LoRA adapters (peft, `pip install peft`) and merge them into "
                           "the saved model, instead of every weight.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available, else cpu.")
    threads: int = Field(0, ge=0, description="CPU threads for torch while training; 0 = torch's default.")
    seed: int = Field(42, ge=0, description="Seed of the trainers (data order, dropout, LoRA init).")
    explored: Literal["predict", "skip"] = Field(
        "predict", description="A generation with an `explored` split (consent.explored): predict = SFT also on its "
        "examples, the loss on the `Naive_Explorer` turns (the model learns what the explorer did, as the explorer); "
        "skip = leave the split out of training.")
    eval_items: str = Field("", description="Held-out prompts for the evaluation (JSONL/parquet with "
                            "conscience.prompt_field), relative to the workspace; empty: the rows of conscience.items "
                            "that conscience.exclude holds out, else the code-hacking scenario's held-out prompts.")
    eval_prompts: int = Field(8, ge=0, description="How many held-out prompts to evaluate on (0 = all).")
    eval_max_tokens: int = Field(128, ge=8, description="Output budget of one evaluated response.")


class JudgementsConfig(Section):
    """How every judgement (critic verdict, panel score, conscience label, consent, audit) is
    read: a distribution over its allowed values, from the engine's token log-probabilities."""
    decide_by: Literal["calibrated", "raw", "generated"] = Field(
        "calibrated", description="calibrated: the distribution divided by the same prompt's distribution for a "
        "content-free input (Zhao et al. 2021, 'Calibrate Before Use'); raw: the distribution as read; generated: "
        "the value the model wrote, with probability 1 (the behaviour before graded judgements).")
    samples: int = Field(5, ge=0, le=50, description="An engine that gives no log-probabilities: answer this many "
                         "more times (other seeds) and use the share of each value (self-consistency); 0: the "
                         "written value alone.")


class JudgesConfig(Section):
    """`ratchet judge` and `ratchet eval-judge`: the model behind each judge of any file, and when a
    judgement abstains (builder/judges.py). Chosen by bench/judges.py (docs/judges.md)."""
    # The judges of other files (`ratchet judge`) are not part of a generation's identity; abstain_below
    # is: it decides which critiques vote and which claims a build keeps.
    grounding: str = Field("bundled:qwen2.5-coder-1.5b", exclude=True, description="The model asked, claim by "
                           "claim, whether a passage supports a claim (after the rules): a GGUF path or bundled:NAME.")
    harm: str = Field("bundled:qwen2.5-coder-1.5b", exclude=True, description="The model asked whether a response "
                      "is harmful or unethical: a GGUF path or bundled:NAME.")
    abstain_below: float = Field(0.5, ge=0.5, le=1.0, description="A model judgement whose confidence "
                                 "max(p, 1 - p) is below this abstains (written with `abstain: true`, for a person "
                                 "to decide; in a build: the claim and note judges', the model auditor's and the "
                                 "critics' judgements go to the top of the audit page's queue; a critic's "
                                 "confidence is its likeliest verdict's probability); 0.5: never abstain.")

    def unsure(self, probs: dict[str, float] | None) -> bool:
        """A judgement too close to call (Trust or Escalate): its likeliest value's probability is
        below the threshold. At 0.5 nothing abstains, though a three-way verdict can sit below one half."""
        return bool(probs) and self.abstain_below > 0.5 and max(probs.values()) < self.abstain_below

    def abstains(self, p: float | None) -> bool:
        """unsure() of a yes/no probability: max(p, 1 - p) below the threshold."""
        return p is not None and self.unsure({"yes": p, "no": 1 - p})


# Tokens a passage's prompt takes besides the passage: the built-in annotation prompts (system,
# persona, two few-shot turns, delimiters, line marks) take about 800 with the bundled tokenizers.
PROMPT_ALLOWANCE = 1024


class PublishConfig(Section):
    """What the dataset card states about the published data."""
    license: str = Field("", description="The dataset's licence, as a Hub licence id (cc-by-4.0, apache-2.0, odc-by, "
                         "other, ...). Your corpus's licence decides what you may state. Empty: the card says no "
                         "licence was stated (Hub id `unknown`) and `ratchet publish` warns.")

    @field_validator("license")
    @classmethod
    def _one_word(cls, value: str) -> str:
        value = value.strip()
        if value and not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", value):
            raise ValueError(f"{value!r} is not a Hub licence id (lower-case, e.g. cc-by-4.0, apache-2.0, other)")
        return value


class ArmsConfig(Section):
    """What every experiment's trained arms share: the same budget for each arm, once per seed."""
    steps: int = Field(20, ge=1, description="Optimizer steps of each trained arm (every arm alike).")
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(2, ge=1)
    max_length: int = Field(512, ge=64, description="Tokens per training sequence.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples (of the items and the seeds) for each interval.")
    seeds: list[int] = Field([42, 43, 44], min_length=1, description="Training seeds: each trained arm is trained "
                             "once per seed, and the intervals cover the seeds as well as the items (the first one "
                             "also seeds the bootstrap).")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: a seed twice trains the same model twice and narrows the interval falsely")
        return value


class CapabilityConfig(ArmsConfig):
    """`ratchet experiment capability`: does training on the reflections help reasoning more than
    training on the same passages without them? Every size is a key: the defaults fit a CPU; for a
    GPU run raise steps, limit (0 = all) and max_length (docs/experiments.md)."""
    items: str = Field("", description="A multiple-choice set: a JSONL, JSON or parquet file, or a `datasets` folder, "
                       "with question, choices (a list) and answer (the right choice's index); category optional. "
                       "Empty: the project's examples/reasoning/reasoning-mc.jsonl (320 items).")
    limit: int = Field(0, ge=0, description="Items scored (the first N); 0 = all.")


class InoculationConfig(ArmsConfig):
    """`ratchet experiment inoculation`: does labelling explored trajectories as `Naive_Explorer`'s
    keep a model that learns to predict them from producing them as the assistant? Held-out
    prompts: those of conscience.items that conscience.exclude holds out (else the code-hacking
    scenario's), each with its explored response and a reference response."""
    sources: list[Literal["vetoed", "rejected"]] = Field(
        ["vetoed", "rejected"], min_length=1, description="Which explored trajectories the labelled and assistant "
        "arms add to the sft split (as consent.explored): vetoed and/or rejected.")
    reference_field: str = Field("secure_response", description="The held-out rows' column holding the reference "
                                 "(good) response the explored one (conscience.response_field) is compared with.")
    limit: int = Field(0, ge=0, description="Held-out prompts scored (the first N); 0 = all.")


class PersonasConfig(Section):
    """`ratchet experiment personas`: were the consent judges' trait predictions right? Each
    predicted trait with enough examples is compared after training: the start model prompted
    to have it, the start model plainly prompted, and the trained model, on a fixed probe set."""
    probes: str = Field("", description="Probe requests: a JSONL file with a `prompt` (and `id`) per row, relative to "
                        "the workspace. Empty: the project's examples/personas/probes.jsonl (24 requests).")
    limit: int = Field(0, ge=0, description="Probes used (the first N); 0 = all.")
    min_examples: int = Field(2, ge=1, description="A trait is checked when at least this many trained examples "
                              "were predicted to reinforce it.")
    traits: int = Field(5, ge=1, description="Check at most this many traits (the most predicted first).")
    controls: list[str] = Field(["a pirate who answers everything in pirate speech"], description="Personas nobody "
                                "predicted, checked the same way: a predicted trait's effect means little if an "
                                "unrelated persona's is as large.")
    max_new_tokens: int = Field(48, ge=8, description="Length of each probe answer (greedy).")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples of the probes for each interval.")
    seed: int = Field(42, ge=0, description="Seed of the bootstrap.")


class FrameworksConfig(Section):
    """`ratchet experiment frameworks`: the same scenario under each conscience framework, under
    variants of the introspective question and under none: the judge's agreement with a labelled
    file, the pairs kept, and the held-out unethical rate after DPO on each condition's pairs."""
    frameworks: list[str] = Field(default_factory=list, description="Frameworks compared (files in "
                                  "prompts/frameworks/ without .toml); empty: every file there.")
    base: str = Field("", description="The framework whose question the variants replace; empty: the first of "
                      "conscience.frameworks.")
    questions: str = Field("", description="A text file, one question variant per line (# comments), relative to "
                           "the workspace; empty: the project's prompts/frameworks/questions.txt.")
    labelled: str = Field("", description="Labelled prompt/response pairs (prompt, response, label = ethical | "
                          "neutral | unethical); empty: examples/code_hacking/judge_eval.jsonl (36 rows).")
    labelled_limit: int = Field(0, ge=0, description="Labelled pairs judged (the first N); 0 = all.")
    limit: int = Field(0, ge=0, description="Scenario training items judged and rewritten per condition (the first "
                       "N of conscience.items without the held-out rows); 0 = all.")
    steps: int = Field(10, ge=1, description="DPO steps on each condition's pairs (every condition alike).")
    learning_rate: float = Field(5e-6, gt=0)
    beta: float = Field(0.1, gt=0)
    batch_size: int = Field(2, ge=1)
    max_length: int = Field(512, ge=64)
    seed: int = Field(42, ge=0, description="Training seed of every condition, and the bootstrap's.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for each interval.")


class EmergentConfig(ArmsConfig):
    """`ratchet experiment emergent-alignment`: SFT on insecure completions alone, with the
    conscience online (a DPO term on the policy's own answers judged by the frozen judge), and
    with the offline dpo split; unethical rates on held-out and general prompts by two judges."""
    seeds: list[int] = Field([42], min_length=1, description="Training seeds: every trained arm once per seed "
                             "(the intervals cover the seeds as well as the prompts).")
    every: int = Field(2, ge=1, description="The online arm: the conscience reviews the policy's answers every this "
                       "many steps (from the first).")
    online_batch: int = Field(8, ge=1, description="Training prompts the policy answers at each review.")
    beta: float = Field(0.1, gt=0, description="DPO beta of the online term.")
    weight: float = Field(1.0, ge=0, description="Weight of the online DPO term: loss = SFT + weight x DPO.")
    max_new_tokens: int = Field(128, ge=8, description="Length of the policy's answers at each review (greedy).")
    framework: str = Field("", description="The framework the judges use (online and in the evaluation); empty: the "
                           "first of conscience.frameworks.")
    second_judge: str = Field("bundled:gemma3", description="A judge of another family than the frozen one "
                              "(conscience.judge): every answer is labelled by both.")
    general: str = Field("", description="General prompts outside coding (JSONL with `prompt`); empty: the project's "
                         "persona probes that are not about code.")
    general_limit: int = Field(8, ge=0, description="General prompts used (the first N); 0 = all.")
    offline_steps: int = Field(10, ge=1, description="The offline arm's DPO steps on the generation's dpo split.")


class ExperimentsConfig(Section):
    """The experiments (`ratchet experiment ...`): not part of a generation's identity."""
    capability: CapabilityConfig = CapabilityConfig()
    inoculation: InoculationConfig = InoculationConfig()
    personas: PersonasConfig = PersonasConfig()
    frameworks: FrameworksConfig = FrameworksConfig()
    emergent: EmergentConfig = EmergentConfig()


class ExecutorStageConfig(Section):
    """One stage's own executor settings ([executor.stages.STAGE]); a key left out is [executor]'s."""
    concurrency: int | None = Field(None, ge=1, le=4096, description="Actors per engine for this stage.")
    batch_size: int | None = Field(None, ge=0, description="Requests per actor batch for this stage.")
    num_cpus: float | None = Field(None, ge=0, description="CPUs per actor for this stage.")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per actor for this stage.")


class ExecutorConfig(Section):
    """Where the model calls run. Not part of a generation's identity (the splits do not depend on
    it): a build may move from this machine to a cluster and keep its cache and its config hash."""
    kind: Literal["local", "ray"] = Field("local", description="local: this process's engines; ray: Ray actors "
                                          "on a Ray cluster (extra .[ray]); `--executor` overrides it.")
    address: str = Field("", description="ray: the cluster: auto (a running `ray start` cluster), local (a new one "
                         "on this machine), ray://HOST:10001 (Ray Client); empty: Ray's default ($RAY_ADDRESS, else "
                         "the cluster last started on this machine, else a new local one).")
    concurrency: int = Field(2, ge=1, le=4096, description="ray: actors per engine (each starts its own model).")
    batch_size: int = Field(0, ge=0, description="ray: requests per actor batch; 0: twice the engine's slots.")
    num_cpus: float = Field(1.0, ge=0, description="ray: CPUs per actor (a llama-server actor uses that many threads).")
    num_gpus: float = Field(0.0, ge=0, description="ray: GPUs per actor (vLLM on GPU nodes).")
    stages: dict[str, ExecutorStageConfig] = Field(
        default_factory=dict, description="Per-stage settings: [executor.stages.annotate] concurrency = 8, ...")


class RatchetConfig(Section):
    corpus: CorpusConfig = CorpusConfig()
    annotator: SerializeAsAny[EngineConfig] = Field(default_factory=lambda: engine_section({}))
    sampling: SamplingConfig = SamplingConfig()
    annotate: AnnotateConfig = AnnotateConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    audit: AuditConfig = AuditConfig()
    conscience: ConscienceConfig = ConscienceConfig()
    consent: ConsentConfig = ConsentConfig()
    ratchet: RatchetRuleConfig = RatchetRuleConfig()
    judgements: JudgementsConfig = JudgementsConfig()
    publish: PublishConfig = PublishConfig()
    # Not part of a dataset generation's identity: left out of model_dump, so the config hash (and the
    # manifest's config) of a compiled generation does not change when only training settings do.
    train: TrainConfig = Field(TrainConfig(), exclude=True)
    executor: ExecutorConfig = Field(ExecutorConfig(), exclude=True)  # where calls run: not what they produce
    experiments: ExperimentsConfig = Field(ExperimentsConfig(), exclude=True)
    judges: JudgesConfig = JudgesConfig()  # in the identity: only abstain_below (see JudgesConfig)

    @field_validator("annotator", mode="before")
    @classmethod
    def _engine_section(cls, value):
        return engine_section(value)

    @model_validator(mode="after")
    def _members_inherit_the_annotator(self):
        self.ensemble.check(self.annotator.model)  # members without a model use annotator.model
        for i, m in enumerate(self.ensemble.members):
            if m.kind == "verifier":
                continue
            try:
                engine = m.engine(self.annotator)  # a member's engine that cannot work fails here, not mid-build
            except (ValidationError, ValueError) as exc:
                raise ValueError(f"ensemble.members[{i}] ({m.display_name}): "
                                 f"{_engine_problem(exc, m.backend or self.annotator.backend)}") from None
            self._check_passages_fit(engine, f"ensemble.members[{i}] ({m.display_name})")
        self.conscience.judge = self.conscience.judge or self.annotator.model
        return self

    def _check_passages_fit(self, engine: EngineConfig, who: str) -> None:
        """A passage of corpus.chunk_tokens, the prompt around it and the output budget must fit
        in the engine's context window: a config error now, not one rejection per passage later."""
        n_ctx = getattr(engine, "n_ctx", None)
        need = self.corpus.chunk_tokens + PROMPT_ALLOWANCE + self.sampling.max_tokens
        if n_ctx is not None and need > n_ctx:
            raise ValueError(f"corpus.chunk_tokens ({self.corpus.chunk_tokens}) + about {PROMPT_ALLOWANCE} tokens of "
                             f"prompt + sampling.max_tokens ({self.sampling.max_tokens}) = {need} do not fit in the "
                             f"context window of {who}: n_ctx = {n_ctx}; lower corpus.chunk_tokens to at most "
                             f"{max(16, n_ctx - PROMPT_ALLOWANCE - self.sampling.max_tokens)} or raise annotator.n_ctx")

    def engine_for(self, model: str, backend: str | None = None) -> EngineConfig:
        """[annotator]'s engine running another model (a judge, the auditor), or another engine."""
        from .backends import registry

        return registry.derive(self.annotator, model=model, backend=backend)


def _engine_problem(exc: Exception, backend: str) -> str:
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(_foreign_engine_key(str(e["loc"][0]), str(e["loc"][0]), backend) if e["type"] == "extra_forbidden"
                     else f"{'.'.join(map(str, e['loc'])) or 'engine'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors())


def model_short_name(spec: str) -> str:
    """bundled:smollm2 -> smollm2, /models/x.gguf -> x, org/Llama-3.1-8B (a served model) -> Llama-3.1-8B."""
    return spec.removeprefix("bundled:") if spec.startswith("bundled:") else Path(spec).name.removesuffix(".gguf")


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an index into a list of tables, e.g. ensemble.members.0
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        inner = [a for a in (field.annotation, *get_args(field.annotation))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return list(model.model_fields)


def _describe(error: dict, data: dict) -> str:
    loc = tuple(error["loc"])
    if not loc:  # a check across sections: its message names the keys
        return error["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden" and loc[0] == "annotator" and len(loc) == 2:
        return _foreign_engine_key(key, str(loc[1]), (data.get("annotator") or {}).get("backend"))
    if error["type"] == "extra_forbidden":
        known = _known_keys(RatchetConfig, loc)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(known)})"
        return f"unknown key '{key}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    return f"'{key}': {message}" + ("" if isinstance(given, dict) else f" (got {given!r})")


def _foreign_engine_key(key: str, name: str, backend: str | None) -> str:
    """A key in [annotator] that the chosen engine does not have: name the engine and the
    engines that do have it (or the closest key of this engine)."""
    from .backends import registry

    backend = backend or registry.DEFAULT
    own = registry.keys_of(backend)
    others = registry.owners(name)
    if others:
        return (f"'{key}' is not a key of engine '{backend}' (it belongs to {', '.join(others)}); "
                f"{backend}'s keys: {', '.join(own)}")
    close = difflib.get_close_matches(name, own, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"{backend}'s keys: {', '.join(own)}"
    return f"unknown key '{key}' ({hint})"


def parse_config(data: dict, source: str = "<config>") -> RatchetConfig:
    try:
        return RatchetConfig.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e, data)}" for e in exc.errors())
        raise ConfigError(f"{source}: invalid config\n{lines}") from None


def load_config(path: Path) -> RatchetConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no config file here (run `ratchet init DIR` to make one)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    cfg = parse_config(data, str(path))
    cfg.annotator._log_dir = path.parent / "logs"  # managed engine servers log into the workspace
    return cfg


def starter_config() -> str:
    """The commented starter config `ratchet init` writes (examples/ratchet.toml)."""
    from .resources import EXAMPLES_DIR

    return (EXAMPLES_DIR / "ratchet.toml").read_text(encoding="utf-8")
