"""Judges for any file: is a text what its passage says (grounding), is a response harmful (harm).

`ratchet judge grounding|harm --input F --output G` writes every row back with its probability
(`p_unsupported`, `p_harmful`); `ratchet eval-judge` scores those probabilities against a label
column. Users calibrate a judge on their own traces before trusting it.

**grounding** is a cascade, claim by claim (a row's `claims`, its one `claim`, or the sentences
of its `text`):

1. *Rules* (builder/faithfulness.py) decide alone where they are certain: a quoted evidence that
   is not a contiguous span of the passage, a number or a name the passage does not have. Such
   a claim gets p_unsupported = RULE_P and no model call.
2. *The model* is asked one short question per remaining claim (schemas/entailment.schema.json:
   the answer is the decision alone), and P(no) is read from the first answer token's
   log-probabilities, calibrated against a content-free input (stages/base.py: grade).

A row's p_unsupported is that of its least supported claim: a text is unfaithful when any of its
claims is. Once a rule rejects one claim of a row, its other claims are not asked.

**harm** asks the model one question per (prompt, response) (schemas/harm.schema.json) and reads
P(yes) the same way.

A judgement whose confidence, max(p, 1 - p), is below `judges.abstain_below` abstains: it is
written with its p and `abstain: true`, for a person to decide (Trust or Escalate, Jung et al.
2024). A rule's verdict never abstains.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .config import RatchetConfig
from .faithfulness import _names, sentences, span_of, words
from .prompts import CLOSE, OPEN, Prompts, datamark
from .stages.base import JudgingTask, Sampling, run_task
from .stages.conscience import ConscienceError, pair_text, read_rows
from .structured import Outcome

KINDS = ("grounding", "harm")
RULE_P = 0.99  # p_unsupported of a claim that a certain rule rejects
MAX_TOKENS = 16  # the answer is one short JSON object
# What each judge's probability is called in the output, and the label values read as positive or negative.
P_FIELD = {"grounding": "p_unsupported", "harm": "p_harmful"}
POSITIVE = {"grounding": {"unsupported", "hallucinated", "hallucination", "unfaithful", "inconsistent",
                          "contradiction", "contradicted", "not supported", "not_supported"},
            "harm": {"harmful", "unethical", "unsafe", "toxic"}}
NEGATIVE = {"grounding": {"supported", "faithful", "consistent", "entailment", "entailed", "grounded"},
            "harm": {"harmless", "ethical", "neutral", "safe", "benign"}}
TRUE, FALSE = {"1", "true", "yes"}, {"0", "false", "no"}

NUMBER_VALUES = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())} | {w: str(10 * i) for i, w in enumerate(
        "thirty forty fifty sixty seventy eighty ninety".split(), start=3)}


class JudgeError(Exception):
    """An input that cannot be judged; the message names the file, the line and the column."""


# ---------------------------------------------------------------- rows


@dataclass
class Claim:
    claim: str
    evidence: str | None = None
    rule: str | None = None  # the certain rule that rejects it, if one does
    p: float | None = None  # p_unsupported
    by: str = "not asked"  # rules | model | not asked (its row was decided by a rule) | no answer

    def as_dict(self) -> dict:
        out = {"claim": self.claim, "p_unsupported": self.p, "by": self.by}
        if self.evidence is not None:
            out["evidence"] = self.evidence
        if self.rule:
            out["rule"] = self.rule
        return out


@dataclass
class Row:
    source: str  # file:line
    data: dict  # the row as read: written back whole, with the judgement added
    label: int | None = None  # 1 positive (unsupported, harmful), 0 negative; only when scoring
    passage: str = ""
    claims: list[Claim] = field(default_factory=list)
    prompt: str = ""
    response: str = ""
    p: float | None = None
    by: str = ""  # rules | model | no answer
    abstain: bool = False
    reason: str | None = None  # why the model gave no usable answer


def _text(row: dict, column: str, source: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise JudgeError(f"{source}: column '{column}' must be a non-empty string (columns: {', '.join(row)})")
    return value


def claims_of(row: dict, source: str, text_field: str = "text") -> list[Claim]:
    """A row's claims: `claims` (strings, or objects with `claim` and an optional `evidence`), one
    `claim` (with an optional `evidence` column), or the sentences of `text_field`."""
    if "claims" in row:
        found = row["claims"]
        if not isinstance(found, list) or not found:
            raise JudgeError(f"{source}: 'claims' must be a non-empty list of strings or of objects with 'claim'")
        out = []
        for j, c in enumerate(found):
            if isinstance(c, str) and c.strip():
                out.append(Claim(c))
            elif isinstance(c, dict) and isinstance(c.get("claim"), str) and c["claim"].strip():
                evidence = c.get("evidence")
                out.append(Claim(c["claim"], evidence if isinstance(evidence, str) else None))
            else:
                raise JudgeError(f"{source}: claims[{j}] is neither a string nor an object with a 'claim' string")
        return out
    if "claim" in row:
        evidence = row.get("evidence")
        return [Claim(_text(row, "claim", source), evidence if isinstance(evidence, str) and evidence.strip() else None)]
    if text_field in row:
        found = sentences(_text(row, text_field, source))
        if not found:
            raise JudgeError(f"{source}: '{text_field}' has no words")
        return [Claim(s) for s in found]
    raise JudgeError(f"{source}: no 'claims', 'claim' or '{text_field}' column to judge (columns: {', '.join(row)})")


def label_of(value, kind: str, source: str, label_means: str = "positive") -> int:
    """1 for a positive row (unsupported, harmful), 0 for a negative one. Named labels are read by
    name ("unsupported", "harmful", "ethical", ...); a number in [0, 1] or a boolean is positive at
    0.5 or above, or negative there with label_means = "negative" (1 = supported / harmless)."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in POSITIVE[kind]:
            return 1
        if name in NEGATIVE[kind]:
            return 0
        if name in TRUE | FALSE:
            value = name in TRUE
        else:
            try:
                value = float(name)
            except ValueError:
                known = ", ".join(sorted(POSITIVE[kind] | NEGATIVE[kind]))
                raise JudgeError(f"{source}: label {value!r} is not a {kind} label (names: {known}; "
                                 "or a number in [0, 1] or a boolean)") from None
    if isinstance(value, bool | int | float) and 0 <= float(value) <= 1:
        positive = int(float(value) >= 0.5)
        return positive if label_means == "positive" else 1 - positive
    raise JudgeError(f"{source}: label {value!r} is not a {kind} label (a name, a number in [0, 1] or a boolean)")


def load(path: Path, kind: str, label_field: str | None = None, label_means: str = "positive",
         passage_field: str = "passage", text_field: str = "text", prompt_field: str = "prompt",
         response_field: str = "response") -> list[Row]:
    """The rows of a JSONL, parquet or `datasets` file, checked: an error names the line."""
    try:
        raw = read_rows(Path(path))
    except ConscienceError as exc:
        raise JudgeError(str(exc)) from None
    if not raw:
        raise JudgeError(f"{path}: no rows")
    return rows_from(raw, kind, label_field, label_means, passage_field, text_field, prompt_field, response_field)


def rows_from(raw: Sequence[tuple[str, dict]], kind: str, label_field: str | None = None,
              label_means: str = "positive", passage_field: str = "passage", text_field: str = "text",
              prompt_field: str = "prompt", response_field: str = "response") -> list[Row]:
    """Rows to judge from (source, row) pairs already in memory (a bench, a notebook)."""
    if kind not in KINDS:
        raise JudgeError(f"unknown judge '{kind}' (one of: {', '.join(KINDS)})")
    rows = []
    for source, data in raw:
        row = Row(source, data)
        if label_field:
            if label_field not in data:
                raise JudgeError(f"{source}: no '{label_field}' column (columns: {', '.join(data)})")
            row.label = label_of(data[label_field], kind, source, label_means)
        if kind == "grounding":
            row.passage, row.claims = _text(data, passage_field, source), claims_of(data, source, text_field)
        else:
            row.prompt, row.response = _text(data, prompt_field, source), _text(data, response_field, source)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- rules


def _values(ws: Sequence[str]) -> set[str]:
    """The numbers among words, spelled ones as digits ("two" and "2" are one value)."""
    return {NUMBER_VALUES.get(w, w) for w in ws if any(ch.isdigit() for ch in w) or w in NUMBER_VALUES}


def certain_rule(claim: Claim, passage: str) -> str | None:
    """The reason a claim is certainly unsupported, or None: its quoted evidence is no span of the
    passage, or it states a number or a name that the passage does not have."""
    if claim.evidence is not None and not span_of(claim.evidence, passage):
        return "evidence not a span of the passage"
    have = words(passage)
    missing = _values(words(claim.claim)) - _values(have)
    if missing:
        return f"number not in the passage: {sorted(missing)[0]}"
    names = _names(claim.claim) - set(have)
    if names:
        return f"name not in the passage: {sorted(names)[0]}"
    return None


# ---------------------------------------------------------------- model tasks


class QuestionTask(JudgingTask[tuple[str, str], Outcome]):
    """One yes/no question about a pair of texts, whose answer is the decision alone: a system
    prompt (prompts/TEMPLATE) and the pair as marked data (`data`)."""
    template = ""
    field, choices = "", ("yes", "no")

    def __init__(self, prompts: Prompts, config: RatchetConfig):
        super().__init__(Sampling.of(config, MAX_TOKENS))
        self.system, self.judging = prompts.render(self.template), config.judgements

    def content_free(self, text: str) -> tuple[str, str]:
        return text, text

    def data(self, item: tuple[str, str]) -> str:
        raise NotImplementedError

    def format_input(self, item: tuple[str, str]) -> tuple[dict, ...]:
        return {"role": "system", "content": self.system}, {"role": "user", "content": self.data(item)}

    def format_output(self, item: tuple[str, str], outcome: Outcome) -> Outcome:
        return outcome


class EntailmentTask(QuestionTask):
    """Is this claim supported by this passage?"""
    schema_name, template, label, field = "entailment", "judge_grounding.system.jinja", "grounding judge", "supported"

    def data(self, item: tuple[str, str]) -> str:
        passage, claim = item
        return f"{OPEN}\n{datamark(passage)}\n{CLOSE}\nClaim:\n{datamark(claim)}"


class HarmTask(QuestionTask):
    """Is this response harmful or unethical?"""
    schema_name, template, label, field = "harm", "judge_harm.system.jinja", "harm judge", "harmful"

    def data(self, item: tuple[str, str]) -> str:
        return pair_text(*item)


def _p(outcome: Outcome, value: str) -> float | None:
    return round(outcome.graded.p(value), 4) if outcome.graded else None


def judge_grounding(rows: list[Row], engine, prompts: Prompts, config: RatchetConfig,
                    advance: Callable[[int], None] | None = None, use_model: bool = True,
                    use_rules: bool = True) -> None:
    """Fill in every row's claims and p (see the module's docstring). Without `use_model`, the
    rules alone: a claim they do not reject gets p = 0; without `use_rules`, the model alone
    (bench/judges.py measures all three)."""
    asked: list[tuple[Row, Claim]] = []
    for row in rows:
        for claim in row.claims:
            claim.rule = certain_rule(claim, row.passage) if use_rules else None
            if claim.rule:
                claim.p, claim.by = RULE_P, "rules"
        if not any(c.rule for c in row.claims):
            asked += [(row, c) for c in row.claims]
    if use_model and asked:
        outcomes = run_task(EntailmentTask(prompts, config), [(r.passage, c.claim) for r, c in asked], engine, advance)
        for (row, claim), outcome in zip(asked, outcomes):
            claim.p, claim.by = _p(outcome, "no"), "model" if outcome.graded else "no answer"
            row.reason = row.reason or outcome.reason
    elif asked:
        for _, claim in asked:
            claim.p, claim.by = 0.0, "rules"
    for row in rows:
        judged = [c for c in row.claims if c.p is not None]
        worst = max(judged, key=lambda c: c.p) if judged else None
        row.p, row.by = (worst.p, worst.by) if worst else (None, "no answer")
        _abstain(row, config)


def judge_harm(rows: list[Row], engine, prompts: Prompts, config: RatchetConfig,
               advance: Callable[[int], None] | None = None) -> None:
    outcomes = run_task(HarmTask(prompts, config), [(r.prompt, r.response) for r in rows], engine, advance)
    for row, outcome in zip(rows, outcomes):
        row.p, row.by, row.reason = _p(outcome, "yes"), "model" if outcome.graded else "no answer", outcome.reason
        _abstain(row, config)


def _abstain(row: Row, config: RatchetConfig) -> None:
    row.abstain = row.by == "model" and config.judges.abstains(row.p)


def model_calls(rows: list[Row], kind: str) -> int:
    """How many questions the model will be asked (the progress bar's total)."""
    if kind == "harm":
        return len(rows)
    return sum(len(r.claims) for r in rows if not any(certain_rule(c, r.passage) for c in r.claims))


def judge(kind: str, rows: list[Row], engine, prompts: Prompts, config: RatchetConfig,
          advance: Callable[[int], None] | None = None) -> None:
    (judge_grounding if kind == "grounding" else judge_harm)(rows, engine, prompts, config, advance)


def output_row(row: Row, kind: str) -> dict:
    out = {**row.data, P_FIELD[kind]: row.p, "judged_by": row.by, "abstain": row.abstain}
    if kind == "grounding":
        out["claims_judged"] = [c.as_dict() for c in row.claims]
    if row.p is None and row.reason:
        out["judge_error"] = row.reason
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """All rows or none: written beside the target, then moved over it."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(partial, path)
