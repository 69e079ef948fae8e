"""Annotate: every annotating ensemble member writes one epistemic reflection per passage
(schemas/annotation.schema.json), or a recorded rejection after its retries."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .. import faithfulness, injection
from ..config import RatchetConfig
from ..corpus import Passage
from ..prompts import Prompts
from ..structured import Outcome
from ..tables import Json, Table, doc, transaction
from .base import BuildContext, ModelTask, Sampling, Stage, run_task


@dataclass
class AnnotationRow:
    generation: int
    passage_id: str
    annotator: str
    status: str = doc("accepted | rejected")
    reason: str | None = doc("why it was rejected (last attempt)")
    attempts: int
    truncated: int = doc("attempts cut off by the token limit")
    record: Json | None = doc("the validated annotation (schemas/annotation.schema.json)")
    call_key: str | None = doc("the model call that produced it")
    trimmed: int | None = doc("strings cut back to a whole sentence or word after reaching their maxLength",
                              default=None, added=True)
    claim_checks: Json | None = doc("each claim the model wrote, with its verdict (supported | dropped) and why "
                                    "(builder/faithfulness.py); the record keeps the supported ones", default=None,
                                    added=True)
    dropped_notes: int | None = doc("notes dropped for a number or name not in the passage, and reflection sentences "
                                    "cut for words it never uses (faithfulness.borne_out)", default=None, added=True)


ANNOTATIONS = Table("annotations", AnnotationRow, key=("generation", "passage_id", "annotator"))


@dataclass
class MemberRow:
    name: str
    family: str = doc("model architecture (GGUF general.architecture)")
    persona: str
    model: str = doc("model file name")
    backend: str


MEMBERS = Table("members", MemberRow, key=("name",), doc="who annotates: the substrate and perspective of each")


class AnnotateTask(ModelTask[Passage, AnnotationRow]):
    schema_name = "annotation"

    def __init__(self, prompts: Prompts, cfg: RatchetConfig, generation: int, annotator: str, persona: str = "default",
                 temperature: float | None = None, few_shot: bool = True):
        super().__init__(Sampling.of(cfg, cfg.sampling.max_tokens, temperature), label=f"annotate ({annotator})")
        self.prompts, self.mark, self.persona, self.gates = prompts, cfg.annotate.datamark, persona, cfg.annotate.gates
        self.generation, self.annotator, self.few_shot = generation, annotator, few_shot
        self.example_runs = faithfulness.example_runs(prompts.examples)  # what an echo of the prompt would share

    def schema(self, passage: Passage) -> dict:
        if not self.gates:
            return super().schema(passage)
        return faithfulness.annotation_schema(passage.text)  # evidence: one of the passage's own spans

    def format_input(self, passage: Passage) -> tuple[dict, ...]:
        return self.prompts.annotation_messages(passage.text, mark=self.mark, persona=self.persona,
                                                examples=self.few_shot)

    def check(self, passage: Passage, record: dict) -> tuple[dict, object, str | None]:
        if not self.gates:
            return record, None, None
        gated = faithfulness.gate(record, passage.text, self.example_runs)
        if (why := injection.carried_out(record, passage.text)) is not None:  # before any other reason
            gated.veto = f"{injection.VETO}: {why}"
        return gated.record, gated, gated.veto

    def format_output(self, passage: Passage, o: Outcome) -> AnnotationRow:
        gated = o.checked
        return AnnotationRow(self.generation, passage.passage_id, self.annotator, o.status, o.reason, o.attempts,
                             o.truncated, o.record, o.call_key, o.trimmed,
                             gated.claim_checks if gated else None, gated.dropped_notes if gated else None)


class Annotate(Stage):
    name = "annotate"
    tables = (ANNOTATIONS, MEMBERS)

    def run(self, ctx: BuildContext) -> dict:
        store_members(ctx.con, ctx.generation, ctx.ensemble)
        cfg = annotation_config(ctx.cfg, ctx.generation)
        judge = (ctx.judge_engine(cfg.annotate.claim_judge, "annotate.claim_judge")
                 if cfg.annotate.gates and cfg.annotate.claim_judge else None)
        for member in ctx.ensemble.annotators:
            task = AnnotateTask(ctx.prompts, cfg, ctx.generation, member.name, member.persona, member.temperature,
                                member.few_shot)
            rows = ctx.run(task, ctx.passages, ctx.engine(member.backend))
            if judge is not None:
                judge_claims(rows, ctx.text(), judge, ctx.prompts, cfg, ctx.run)
            ctx.per_member[member.name] = rows
            with transaction(ctx.con):
                ctx.con.execute("DELETE FROM annotations WHERE generation = ? AND annotator = ?",
                                [ctx.generation, member.name])
                ANNOTATIONS.insert(ctx.con, rows)
        ctx.accepted = accepted_annotations(ctx.per_member)
        rows = [r for rows in ctx.per_member.values() for r in rows]
        return {**annotation_metrics(rows), "injection": injection_metrics(rows, ctx.passages)}


def annotate(passages: list[Passage], engine, prompts: Prompts, config: RatchetConfig, on_progress=None,
             persona: str = "default", temperature: float | None = None, generation: int = 1,
             annotator: str = "annotator", few_shot: bool = True) -> list[AnnotationRow]:
    """Annotate passages with one cached engine outside a build (benches, notebooks, tests)."""
    return run_task(AnnotateTask(prompts, config, generation, annotator, persona, temperature, few_shot), passages,
                    engine, on_progress)


def judge_claims(rows: list[AnnotationRow], texts: dict[str, str], engine, prompts: Prompts, cfg: RatchetConfig,
                 run=None) -> None:
    """The claim judge, after the rules: every claim an accepted annotation still holds is asked
    of the grounding judge (builder/judges.py: EntailmentTask) in one batch; its calibrated
    P(unsupported) is kept in the claim's check, and a claim at or above annotate.claim_threshold
    is dropped, unless the judge abstains (judges.abstain_below): the claim stays, marked
    `abstain`, and the audit stage sends the annotation to a person. An annotation left without a claim is rejected ("no supported claim"): the model
    is asked only where the rules could not decide, and never overrules a rule's drop."""
    from ..judges import EntailmentTask

    asked = [(r, c) for r in rows if r.status == "accepted" for c in r.record["claims"]]
    if not asked:
        return
    task = EntailmentTask(prompts, cfg)
    items = [(texts[r.passage_id], c["claim"]) for r, c in asked]
    outcomes = run(task, items, engine) if run else run_task(task, items, engine)
    threshold = cfg.annotate.claim_threshold
    for (row, claim), outcome in zip(asked, outcomes):
        p = round(outcome.graded.p("no"), 4) if outcome.graded else None
        check = next(x for x in row.claim_checks if x["verdict"] == "supported" and x["claim"] == claim["claim"]
                     and "p_unsupported" not in x)
        check["p_unsupported"] = p
        if cfg.judges.abstains(p):  # too unsure to drop or to vouch for: a person decides (the audit queue)
            check["abstain"] = True
        elif p is not None and p >= threshold:
            check["verdict"], check["reason"] = "dropped", f"claim judge: P(unsupported) {p:.2f}"
            row.record["claims"] = [c for c in row.record["claims"] if c is not claim]
    for row in rows:
        if row.status == "accepted" and not row.record["claims"]:
            row.status, row.record, row.reason = "rejected", None, "no supported claim: claim judge"


def annotation_config(cfg: RatchetConfig, generation: int) -> RatchetConfig:
    """With ratchet.reseed, each generation samples its annotations with its own seed."""
    if not cfg.ratchet.reseed or generation == 1:
        return cfg
    return cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"seed": cfg.sampling.seed + 1000 * (generation - 1)})})


def store_members(con, generation: int, ensemble) -> None:
    """Record who annotates; drop this generation's annotations by members no longer in the
    ensemble (a renamed or removed member), so the splits and the audit see only this one's."""
    with transaction(con):
        MEMBERS.insert(con, [MemberRow(m.name, m.family, m.persona, m.backend.model_name, m.backend.kind)
                             for m in ensemble.members]
                       + [MemberRow(v.name, v.family, v.persona, "-", "none") for v in ensemble.verifiers],
                       on_conflict="replace")
        con.execute("DELETE FROM annotations WHERE generation = $g AND annotator NOT IN (SELECT unnest($names))",
                    {"g": generation, "names": [m.name for m in ensemble.annotators]})


def accepted_annotations(per_member: dict[str, list[AnnotationRow]]) -> list[tuple[str, str, dict]]:
    """(passage_id, annotator, record) of every accepted annotation, in a stable order."""
    return sorted((r.passage_id, name, r.record) for name, rows in per_member.items()
                  for r in rows if r.status == "accepted")


def annotation_metrics(rows: list[AnnotationRow]) -> dict:
    attempts = sum(r.attempts for r in rows)
    reasons = Counter((r.reason or "").split(":")[0] for r in rows if r.status == "rejected")
    return {"annotations": len(rows), "accepted": sum(r.status == "accepted" for r in rows),
            "rejected": sum(r.status == "rejected" for r in rows), "rejection_reasons": dict(sorted(reasons.items())),
            "attempts": attempts,
            "truncation_rate": round(sum(r.truncated for r in rows) / attempts, 4) if attempts else 0.0,
            "trimmed_strings": sum(r.trimmed or 0 for r in rows if r.status == "accepted"),
            "faithfulness": faithfulness_metrics(rows)}


def faithfulness_metrics(rows: list[AnnotationRow]) -> dict:
    """What the gates did to the accepted annotations (the last attempt of each): claims kept,
    claims dropped by reason, notes dropped; and the vetoes that rejected annotations."""
    checks = [c for r in rows if r.status == "accepted" for c in r.claim_checks or []]
    kept = sum(c["verdict"] == "supported" for c in checks)
    dropped = Counter(c["reason"].split(":")[0] for c in checks if c["verdict"] != "supported")
    vetoes = Counter((r.reason or "").split(":")[0] for r in rows if r.status == "rejected"
                     and (r.reason or "").split(":")[0] in (*faithfulness.VETOES, injection.VETO))
    requoted = sum(c["verdict"] == "supported" and (c["reason"] or "").startswith(faithfulness.REQUOTED) for c in checks)
    return {"claims_written": len(checks), "claims_kept": kept, "claims_dropped": dict(sorted(dropped.items())),
            "quotes_rechosen": requoted,
            "verified_share": round(kept / len(checks), 4) if checks else None,
            "notes_dropped": sum(r.dropped_notes or 0 for r in rows if r.status == "accepted"),
            "vetoed": dict(sorted(vetoes.items()))}


def injection_metrics(rows: list[AnnotationRow], passages: list[Passage]) -> dict:
    """Passages that give orders (builder/injection.py), the annotations of them kept, and those
    the injection gate vetoed (their last attempt carried an order out)."""
    giving = {p.passage_id for p in passages if injection.orders(p.text)}
    return {"passages_with_orders": len(giving),
            "kept": sum(r.status == "accepted" and r.passage_id in giving for r in rows),
            "vetoed": sum(r.status == "rejected" and (r.reason or "").startswith(injection.VETO) for r in rows)}
