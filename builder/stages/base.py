"""The stage contract: what every step of a build implements, and the one runner that does the
model work for all of them.

A **stage** (datatrove's pipeline step) is one class with a `run(ctx)` over the build's
context that writes its tables and returns its metrics; `prepare(ctx)` checks what it can
before any model is loaded. The build is the list of stages in build.py.

A **model task** (distilabel's task) is the part of a stage that asks a model: it declares
its JSON Schema, how an item becomes messages (`format_input`) and how an outcome becomes a
stored row (`format_output`). `run_task` does the rest for every task alike: the request per
attempt (a retry reseeds), the call cache, validation, retries, progress and the rejection
reason of an item that never got a valid answer. A task never names an engine or an
executor: it is handed a cached engine, and the engine hands the requests that missed the
cache to the build's executor.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..backends.base import Backend, Request
from ..cache import CachedBackend
from ..config import RatchetConfig
from ..resources import load_schema
from ..structured import Outcome, generate_valid, retry_sampling
from ..tables import Table

if TYPE_CHECKING:
    from ..ensemble import Ensemble
    from ..executors import Executor
    from ..prompts import Prompts
    from ..workspace import Workspace

Item = TypeVar("Item")
Row = TypeVar("Row")


class RatchetError(Exception):
    """A generation that cannot be built as asked (no parent, a panel that changed). Here, below
    every stage, because more than one raises it (ingest and the ratchet)."""


# ---------------------------------------------------------------- model tasks


@dataclass(frozen=True)
class Sampling:
    """How a task samples: fixed for the task, so the same item gives the same request (and
    the same cache key) in every build."""
    max_tokens: int
    temperature: float
    top_p: float
    repeat_penalty: float
    seed: int
    retries: int  # extra attempts after an invalid output, each with the next seed
    at_bound: str = "trim"  # a string at its maxLength: trim it back, or retry (annotate.at_length_bound)

    @classmethod
    def of(cls, cfg: RatchetConfig, max_tokens: int, temperature: float | None = None) -> "Sampling":
        s = cfg.sampling
        return cls(max_tokens, s.temperature if temperature is None else temperature, s.top_p, s.repeat_penalty,
                   s.seed, cfg.annotate.retries, cfg.annotate.at_length_bound)


class ModelTask(ABC, Generic[Item, Row]):
    """Asks a model for one schema-valid JSON answer per item. Subclasses set `schema_name`
    (schemas/NAME.schema.json) or override `schema`, and write `format_input` and
    `format_output`."""

    schema_name: str = ""
    label: str = ""  # the progress bar's description
    # Set for an answer that is free text (code, say): the request carries no schema and the text
    # becomes {text_field: text}, validated against the schema (structured.check_text).
    text_field: str = ""

    def __init__(self, sampling: Sampling, label: str | None = None):
        self.sampling = sampling
        if label is not None:
            self.label = label

    def schema(self, item: Item) -> dict:
        return load_schema(self.schema_name)

    @abstractmethod
    def format_input(self, item: Item) -> tuple[dict, ...]:
        """The chat messages for one item; its text is data, marked as such by the prompts."""

    @abstractmethod
    def format_output(self, item: Item, outcome: Outcome) -> Row:
        """The row stored for one item: its record on success, the reason otherwise."""

    def check(self, item: Item, record: dict) -> tuple[dict, object, str | None]:
        """A valid answer's own check beyond its schema: (the record to keep, what was found,
        a veto or None). A veto is retried with the next seed like an invalid answer."""
        return record, None, None

    def request(self, item: Item, attempt: int) -> Request:
        s = self.sampling
        return Request(self.format_input(item), None if self.text_field else self.schema(item), max_tokens=s.max_tokens,
                       temperature=retry_sampling(s.temperature, attempt), top_p=s.top_p,
                       repeat_penalty=s.repeat_penalty, seed=s.seed + attempt)


def run_task(task: ModelTask[Item, Row], items: Sequence[Item], engine: CachedBackend,
             advance: Callable[[int], None] | None = None) -> list[Row]:
    """Every item through the task: cache, validation, retries (reseeded), progress (`advance`,
    called once per finished item: see `BuildContext.step`). Never raises for one item: an item
    without a valid answer gets its rejection reason. A judging task's outcomes are graded
    (a distribution over its values) before they become rows."""
    outcomes = generate_valid(len(items), lambda i, attempt: task.request(items[i], attempt), engine,
                              task.sampling.retries, on_done=(lambda i, out: advance(1)) if advance else None,
                              at_bound=task.sampling.at_bound, text_field=task.text_field,
                              schema_of=lambda i: task.schema(items[i]),
                              check=lambda i, record: task.check(items[i], record))
    if isinstance(task, JudgingTask):
        grade(task, items, outcomes, engine)
    return [task.format_output(item, outcome) for item, outcome in zip(items, outcomes)]


# ---------------------------------------------------------------- graded judgements


@dataclass
class Graded:
    """A judgement as a distribution over its allowed values."""
    raw: dict[str, float] | None  # as read from the engine (None: it gave none)
    calibrated: dict[str, float] | None  # raw divided by the content-free baseline, normalised
    method: str  # logprobs | scripted | samples | decoded (the written value alone)
    probs: dict[str, float]  # the distribution that decides (judgements.decide_by)
    decided: str  # its most likely value

    def p(self, value: str) -> float:
        return self.probs.get(value, 0.0)


class JudgingTask(ModelTask[Item, Row]):
    """A model task whose answer ends with a decision among fixed values. Subclasses set `field`
    and `choices` and give `content_free(item)`: the item with its content replaced by `text`
    ("" and "N/A"), the input whose answers measure the prompt's own bias."""

    field: str = ""
    choices: tuple[str, ...] = ()
    judging = None  # config.JudgementsConfig; set by the stage (default: the config's defaults)
    baseline: dict[str, float] | None = None  # set by grade(): the content-free distribution
    calibration_attempts: int = 0

    def request(self, item: Item, attempt: int) -> Request:
        return dataclasses.replace(super().request(item, attempt), decision=(self.field, self.choices))

    @abstractmethod
    def content_free(self, text: str) -> Item:
        """An item like the task's, with its content replaced by `text`."""


def abstains(outcome: Outcome | None, judges) -> bool:
    """A valid judgement whose distribution is too close to call under judges.abstain_below
    (config.JudgesConfig.unsure); None judges: never. The critics, the conscience judge and the
    consent judges read their abstentions here."""
    return bool(judges and outcome is not None and outcome.record is not None and outcome.graded
                and judges.unsure(outcome.graded.probs))


def graded_columns(outcome: Outcome) -> tuple:
    """(probs, calibrated, method) of an outcome, for the columns every judging table has."""
    g = outcome.graded
    return (g.raw, g.calibrated, g.method) if g else (None, None, None)


def _probs(decision: dict | None, choices: Sequence[str]) -> dict[str, float] | None:
    if not decision or not decision.get("logprobs"):
        return None
    probs = {c: math.exp(decision["logprobs"].get(c, -math.inf)) for c in choices}
    total = sum(probs.values())
    return {c: p / total for c, p in probs.items()} if total > 0 else None


def _samples(task: JudgingTask, item, engine: CachedBackend, n: int) -> dict[str, float] | None:
    """Self-consistency: the share of each value over n more answers with other seeds."""
    requests = [task.request(item, 100 + i) for i in range(n)]  # attempts far from the retries' seeds
    values = []
    for response in engine.generate(requests):
        try:
            value = json.loads(response.text).get(task.field) if response.finish_reason == "stop" else None
        except (json.JSONDecodeError, AttributeError):
            value = None
        if value in task.choices:
            values.append(value)
    return {c: values.count(c) / len(values) for c in task.choices} if values else None


def baseline(task: JudgingTask, engine: CachedBackend) -> tuple[dict[str, float] | None, int]:
    """The task's distribution for content-free inputs ("" and "N/A"), averaged: what the prompt
    and the model say when there is nothing to judge (None: no distribution could be read), and
    the attempts it took. Cached like every call."""
    free = [task.content_free(text) for text in ("", "N/A")]
    outcomes = generate_valid(len(free), lambda i, attempt: task.request(free[i], attempt), engine,
                              task.sampling.retries, at_bound=task.sampling.at_bound)
    attempts = sum(o.attempts for o in outcomes)
    read = [p for o in outcomes if (p := _probs(o.decision, task.choices))]
    if not read:
        return None, attempts
    return {c: round(sum(p[c] for p in read) / len(read), 6) for c in task.choices}, attempts


def calibrate(raw: dict[str, float], base: dict[str, float] | None) -> dict[str, float] | None:
    if base is None:
        return None
    scaled = {c: p / max(base.get(c, 0.0), 1e-6) for c, p in raw.items()}
    total = sum(scaled.values())
    return {c: v / total for c, v in scaled.items()} if total > 0 else None


def grade(task: JudgingTask, items: Sequence, outcomes: list[Outcome], engine: CachedBackend) -> dict | None:
    """Give every accepted outcome its Graded judgement; returns the content-free baseline."""
    from ..config import JudgementsConfig

    judging = task.judging or JudgementsConfig()
    accepted = [(item, o) for item, o in zip(items, outcomes) if o.record is not None]
    if not accepted:
        return None
    base, attempts = baseline(task, engine) if judging.decide_by == "calibrated" else (None, 0)
    task.baseline, task.calibration_attempts = base, attempts
    for item, o in accepted:
        written = o.record.get(task.field)
        raw, method = _probs(o.decision, task.choices), (o.decision or {}).get("method")
        if raw is None and judging.samples and judging.decide_by != "generated":
            raw, method = _samples(task, item, engine, judging.samples), "samples"
        if raw is None:
            raw, method = None, "decoded"
        calibrated = calibrate(raw, base) if raw is not None else None
        if judging.decide_by == "generated" or raw is None:
            probs = {c: float(c == written) for c in task.choices}
        else:
            probs = calibrated if judging.decide_by == "calibrated" and calibrated else raw
        o.graded = Graded(raw, calibrated, method, probs, max(task.choices, key=lambda c: probs[c]))
    return base


def progress_step(progress, label: str, total: int) -> Callable[[int], None] | None:
    """One progress bar (a rich Progress task); None without a Progress or without work."""
    if progress is None or not total:
        return None
    task = progress.add_task(label, total=total)
    return lambda n: progress.advance(task, n)


# ---------------------------------------------------------------- stages and the build context


@dataclass
class BuildContext:
    """What every stage of one build sees: where it writes, what it was told, what the
    earlier stages found. Stages read and set the typed fields below; nothing else is shared."""
    ws: "Workspace"
    con: Any  # the DuckDB connection: the driver is its only writer
    generation: int
    cfg: RatchetConfig
    prompts: "Prompts"
    log: logging.Logger
    progress: Any = None  # a rich Progress, or None
    executor: "Executor | None" = None
    corpus: str | None = None  # `--corpus`: ingest this instead of corpus.path
    overwrite: bool = False
    ensemble: "Ensemble | None" = None
    stack: ExitStack = field(default_factory=ExitStack)  # engines loaded for this build close with it
    engines: dict[int, CachedBackend] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)  # each judging task's content-free baseline
    # What the stages pass on, in build order.
    passages: list = field(default_factory=list)
    report: Any = None  # corpus.IngestReport
    per_member: dict = field(default_factory=dict)  # annotator name -> list[AnnotationRow]
    accepted: list = field(default_factory=list)  # (passage_id, annotator, record) of every accepted annotation
    critiques: list = field(default_factory=list)
    scored: list = field(default_factory=list)
    selections: list = field(default_factory=list)
    agreements: list = field(default_factory=list)
    conscience_input: Any = None
    pairs: list = field(default_factory=list)
    examples: list = field(default_factory=list)
    output: Any = None  # the compiled generation's folder
    written: bool = False
    started: float = field(default_factory=time.perf_counter)

    def engine(self, backend: Backend) -> CachedBackend:
        """The cached engine of a loaded backend (one per backend, so its stats count once)."""
        if id(backend) not in self.engines:
            self.engines[id(backend)] = CachedBackend(backend, self.con, self.log, executor=self.executor)
        return self.engines[id(backend)]

    def judge_engine(self, model: str, who: str) -> CachedBackend:
        """A judge's, auditor's or checkpoint's engine: a member's loaded model when it is the
        same engine config, otherwise loaded for this build (closed when the build ends)."""
        return self.engine(self.ensemble.load(self.cfg.engine_for(model), self.stack, who))

    def step(self, label: str, total: int) -> Callable[[int], None] | None:
        return progress_step(self.progress, label, total)

    def run(self, task: ModelTask, items: Sequence, engine: CachedBackend, advance=None) -> list:
        """run_task with this build's progress (a bar per task unless `advance` is given) and
        its bookkeeping: a judging task's content-free baseline goes to the summary."""
        rows = run_task(task, items, engine, advance if advance is not None else self.step(task.label, len(items)))
        if isinstance(task, JudgingTask) and (task.baseline or task.calibration_attempts):
            self.calibration.append({"task": task.label, "judge": engine.backend.model_name,
                                     "baseline": task.baseline, "attempts": task.calibration_attempts})
        return rows

    def text(self) -> dict[str, str]:
        return {p.passage_id: p.text for p in self.passages}


class Stage(ABC):
    """One step of a build. `name` keys its log lines; `tables` are created before any stage
    runs; `prepare` runs for every stage before any model is loaded (fail fast); `run` does
    the work and returns metrics, merged into the build's summary and manifest."""

    name: str = ""
    tables: tuple[Table, ...] = ()

    def prepare(self, ctx: BuildContext) -> None:  # noqa: B027 - optional
        pass

    @abstractmethod
    def run(self, ctx: BuildContext) -> dict | None:
        ...


class ModelStage(ModelTask[Item, Row], Stage):
    """A stage that is one model task: by default over the generation's passages, answered by
    the first annotating member's engine, its rows replacing the generation's rows of `table`.
    A subclass writes `format_input` and `format_output` (and `schema` or `schema_name`), and
    overrides `items`, `engine_for`, `sampling_for` or `store` where it needs another."""

    table: Table | None = None
    max_tokens: int = 256

    def __init__(self):  # sampling comes from the build's config, in run()
        self.ctx: BuildContext | None = None

    @property
    def tables(self) -> tuple[Table, ...]:
        return (self.table,) if self.table else ()

    def sampling_for(self, ctx: BuildContext) -> Sampling:
        return Sampling.of(ctx.cfg, self.max_tokens)

    def items(self, ctx: BuildContext) -> list:
        return ctx.passages

    def engine_for(self, ctx: BuildContext) -> CachedBackend:
        return ctx.engine(ctx.ensemble.annotators[0].backend)

    def store(self, ctx: BuildContext, rows: list) -> None:
        if self.table:
            self.table.replace_generation(ctx.con, ctx.generation, rows)

    def run(self, ctx: BuildContext) -> dict:
        self.ctx, self.sampling = ctx, self.sampling_for(ctx)
        items = self.items(ctx)
        rows = ctx.run(self, items, self.engine_for(ctx), ctx.step(self.label or self.name, len(items)))
        self.store(ctx, rows)
        return {self.name: {"items": len(items), "rows": len(rows)}}
