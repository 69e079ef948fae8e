"""Annotate: every annotating ensemble member writes one epistemic reflection per passage
(schemas/annotation.schema.json), or a recorded rejection after its retries. With
annotate.best_of = N, a member samples N candidates per passage and the one with the most
verified claims is kept (`choose`). An answer whose claims the gates verify but whose
reflection they refuse whole is kept (annotate.refused_reflection): its reflection is rebuilt
from its claims' quotes, or first asked again of its writer alone (`ReproseTask`)."""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

from .. import faithfulness, injection
from ..backends.base import Request
from ..config import RatchetConfig
from ..corpus import Passage
from ..prompts import Prompts
from ..resources import load_schema
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
    dropped_notes: int | None = doc("notes dropped for a number or name not in the passage, and sentences of the "
                                    "notes and the reflection cut (faithfulness.unborne)", default=None,
                                    added=True)
    candidate: int | None = doc("which of the member's annotate.best_of samples this is (0: the first)", default=None,
                                added=True)
    candidates: Json | None = doc("every sample of this passage by this member: its status, reason, attempts, claims "
                                  "verified and words the passage does not bear out (why this one was kept)",
                                  default=None, added=True)
    note_checks: Json | None = doc("each note and reflection sentence the note judge was asked of: its field, "
                                   "text, P(unsupported) and verdict (kept | cut | abstain | unjudged), and a "
                                   "reflection rebuilt from its claims' quotes (rebuilt); the record keeps the kept "
                                   "ones", default=None, added=True)
    rewrite: Json | None = doc("a reflection the gates refused whole in an answer whose claims they verified: the "
                               "reflection as written and why (written, why), then what came of it (verdict rebuilt "
                               "from the claims' quotes | rewritten by its writer; the writer's tries, the last "
                               "refusal and call_key: none when rebuilt at once)", default=None, added=True)


ANNOTATIONS = Table("annotations", AnnotationRow, key=("generation", "passage_id", "annotator"))


@dataclass
class MemberRow:
    name: str
    family: str = doc("model architecture (GGUF general.architecture)")
    persona: str
    model: str = doc("model file name")
    backend: str


MEMBERS = Table("members", MemberRow, key=("name",), doc="who annotates: the substrate and perspective of each")


@dataclass(frozen=True)
class Candidate:
    """One of a member's samples of one passage (annotate.best_of)."""
    passage: Passage
    index: int = 0


# The reflection alone: at most 300 characters (about 80 tokens) and its JSON key.
REPROSE_MAX_TOKENS = 128

# Seeds of candidate k start at seed + k * stride: past any retry's seed (retries <= 10) and,
# with best_of <= 8, short of the next generation's (annotation_config: + 1000).
CANDIDATE_SEED_STRIDE = 16


class AnnotateTask(ModelTask[Candidate, AnnotationRow]):
    schema_name = "annotation"

    def __init__(self, prompts: Prompts, cfg: RatchetConfig, generation: int, annotator: str, persona: str = "default",
                 temperature: float | None = None, few_shot: bool = True):
        super().__init__(Sampling.of(cfg, cfg.sampling.max_tokens, temperature), label=f"annotate ({annotator})")
        self.prompts, self.mark, self.persona, self.gates = prompts, cfg.annotate.datamark, persona, cfg.annotate.gates
        self.generation, self.annotator, self.few_shot = generation, annotator, few_shot
        self.refused = cfg.annotate.refused_reflection if self.gates else "retry"
        self.cfg = cfg
        self.candidate_temperature = cfg.annotate.candidate_temperature
        self.example_runs = faithfulness.example_runs(prompts.examples)  # what an echo of the prompt would share
        self.notice = faithfulness.notice_stems(prompts.audit_notice)  # the audit notice's own words

    def schema(self, item: Candidate) -> dict:
        if not self.gates:
            return super().schema(item)
        return faithfulness.annotation_schema(item.passage.text)  # evidence: one of the passage's own spans

    def format_input(self, item: Candidate) -> tuple[dict, ...]:
        return self.prompts.annotation_messages(item.passage.text, mark=self.mark, persona=self.persona,
                                                examples=self.few_shot)

    def request(self, item: Candidate, attempt: int) -> Request:
        request = super().request(item, attempt)
        if item.index == 0:  # the request of best_of = 1: its cached answer is reused
            return request
        return dataclasses.replace(request, seed=request.seed + CANDIDATE_SEED_STRIDE * item.index,
                                   temperature=max(request.temperature, self.candidate_temperature))

    def check(self, item: Candidate, record: dict) -> tuple[dict, object, str | None]:
        return self.gated(item, record, rewrite=self.refused != "retry")

    def gated(self, item: Candidate, record: dict, rewrite: bool) -> tuple[dict, object, str | None]:
        """The gates and the injection veto on one answer; with `rewrite`, a veto of the
        reflection alone is lifted (`prose_only`): the answer is kept with an empty reflection
        and `unsaid` says what was written and why it went."""
        if not self.gates:
            return record, None, None
        gated = faithfulness.gate(record, item.passage.text, self.example_runs, self.notice,
                                  orders=injection.orders(item.passage.text))
        if (why := injection.carried_out(record, item.passage.text)) is not None:  # before any other reason
            gated.veto = f"{injection.VETO}: {why}"
        elif rewrite and prose_only(gated):  # its verified claims stay; the prose is rebuilt or asked again
            gated.unsaid, gated.veto = {"written": record.get("reflection") or "", "why": gated.veto}, None
            gated.record = {**gated.record, "reflection": ""}
        return gated.record, gated, gated.veto

    def format_output(self, item: Candidate, o: Outcome) -> AnnotationRow:
        gated = o.checked
        return AnnotationRow(self.generation, item.passage.passage_id, self.annotator, o.status, o.reason, o.attempts,
                             o.truncated, o.record, o.call_key, o.trimmed,
                             gated.claim_checks if gated else None, gated.dropped_notes if gated else None,
                             candidate=item.index, rewrite=gated.unsaid if gated and o.record else None)


def prose_only(gated: faithfulness.Gated) -> bool:
    """The gates refused the reflection alone: the answer keeps a verified claim."""
    return bool(gated.veto and gated.veto.startswith(f"{faithfulness.PROSE_VETO}:") and gated.record["claims"])


class ReproseTask(ModelTask[AnnotationRow, Outcome]):
    """The reflection alone, asked again of the writer of an answer whose verified claims the
    gates kept and whose reflection they refused whole: the annotation's conversation, the
    answer as the writer's turn (its verified claims and kept notes; not the refused reflection,
    which the writer then turned into "The passage does not support ...": docs/faithfulness.md),
    and annotate.reprose.jinja. Its reflection goes through the same gates as a whole answer's
    (`AnnotateTask.gated` on the answer with the new reflection, the lift off); a try they refuse
    is retried with the next seed."""

    def __init__(self, annotate: AnnotateTask, passages: dict[str, Passage]):
        cfg = annotate.cfg
        super().__init__(dataclasses.replace(Sampling.of(cfg, REPROSE_MAX_TOKENS, annotate.sampling.temperature),
                                             retries=cfg.annotate.rewrite_reflection - 1),
                         label=f"reflection again ({annotate.annotator})")
        self.annotate, self.passages = annotate, passages

    def schema(self, item: AnnotationRow) -> dict:
        reflection = load_schema("annotation")["properties"]["reflection"]
        return {"type": "object", "additionalProperties": False, "required": ["reflection"],
                "properties": {"reflection": reflection}}

    def answer(self, item: AnnotationRow) -> dict:
        return {k: v for k, v in item.record.items() if k != "reflection"}

    def format_input(self, item: AnnotationRow) -> tuple[dict, ...]:
        a = self.annotate
        return a.prompts.reprose_messages(self.passages[item.passage_id].text, self.answer(item), mark=a.mark,
                                          persona=a.persona, examples=a.few_shot)

    def check(self, item: AnnotationRow, record: dict) -> tuple[dict, object, str | None]:
        kept, gated, veto = self.annotate.gated(Candidate(self.passages[item.passage_id]),
                                                {**item.record, "reflection": record["reflection"]}, rewrite=False)
        return {"reflection": kept["reflection"]}, gated, veto

    def format_output(self, item: AnnotationRow, o: Outcome) -> Outcome:
        return o


def candidates(passages: list[Passage], best_of: int) -> list[Candidate]:
    """Every passage's candidates, the first ones of all passages first (they are best_of = 1's)."""
    return [Candidate(p, k) for k in range(best_of) for p in passages]


def verified_claims(row: AnnotationRow) -> int:
    return len(row.record["claims"]) if row.status == "accepted" else 0


def as_written(row: AnnotationRow) -> dict:
    """An accepted row's record with its reflection as the writer wrote it, where the gates
    refused it whole (the empty one would count no word against it)."""
    return {**row.record, "reflection": row.rewrite["written"]} if row.rewrite else row.record


def choose(rows: list[AnnotationRow], texts: dict[str, str]) -> list[AnnotationRow]:
    """One row per passage, in the order of their first candidates: of a passage's samples, an
    accepted one with the most verified claims, a tie going to fewer words the passage does not
    bear out (faithfulness.unsupported_words), then to the earlier sample. With no accepted
    sample, the first one's rejection stands. Every sample is summed up in the kept row."""
    by_passage: dict[str, list[AnnotationRow]] = {}
    for row in rows:
        by_passage.setdefault(row.passage_id, []).append(row)
    chosen = []
    for pid, group in by_passage.items():
        unsupported = [faithfulness.unsupported_words(as_written(r), r.claim_checks or [], texts[pid])
                       if r.status == "accepted" else None for r in group]
        best = max(range(len(group)), key=lambda i: (group[i].status == "accepted", verified_claims(group[i]),
                                                    -(unsupported[i] or 0), -i))
        row = group[best]
        row.candidates = [{"candidate": r.candidate, "status": r.status, "reason": r.reason, "attempts": r.attempts,
                           "claims": verified_claims(r), "unsupported_words": u} for r, u in zip(group, unsupported)]
        chosen.append(row)
    return chosen


def annotate_passages(task: AnnotateTask, passages: list[Passage], best_of: int, engine, run=None,
                      advance=None) -> list[AnnotationRow]:
    """`best_of` candidates of every passage in one batch (the engine's slots work on all of
    them at once), then the kept one of each."""
    items = candidates(passages, best_of)
    rows = run(task, items, engine) if run else run_task(task, items, engine, advance)
    chosen = choose(rows, {p.passage_id: p.text for p in passages})
    rewrite_reflections(task, chosen, {p.passage_id: p for p in passages}, engine, run)
    return chosen


def rewrite_reflections(task: AnnotateTask, rows: list[AnnotationRow], passages: dict[str, Passage], engine,
                        run=None) -> None:
    """Every kept answer whose reflection the gates refused whole (`AnnotationRow.rewrite`)
    gets one rebuilt from its claims' quotes (`faithfulness.quotes_said`), or, with
    annotate.refused_reflection = ask, first one written again by its writer (`ReproseTask`, in
    one batch). A row left without a quote to give (every one holds an order of its passage) is
    rejected."""
    refused = [r for r in rows if r.status == "accepted" and r.rewrite and not r.record["reflection"]]
    outcomes = [None] * len(refused)
    if refused and task.refused == "ask":
        reprose = ReproseTask(task, passages)
        outcomes = run(reprose, refused, engine) if run else run_task(reprose, refused, engine)
    for row, o in zip(refused, outcomes):
        row.rewrite = {**row.rewrite, "attempts": o.attempts if o else 0, "call_key": o.call_key if o else None,
                       "reason": o.reason if o else None}
        if o is not None and o.status == "accepted":
            row.record["reflection"], row.rewrite["verdict"] = o.record["reflection"], REWRITTEN
            continue
        row.rewrite["verdict"] = REBUILT
        row.record["reflection"] = faithfulness.quotes_said(row.record["claims"],
                                                            injection.orders(passages[row.passage_id].text))
        if not row.record["reflection"]:
            row.status, row.record, row.reason = "rejected", None, row.rewrite["why"]


class Annotate(Stage):
    name = "annotate"
    tables = (ANNOTATIONS, MEMBERS)

    def run(self, ctx: BuildContext) -> dict:
        store_members(ctx.con, ctx.generation, ctx.ensemble)
        cfg = annotation_config(ctx.cfg, ctx.generation)
        engines: dict[str, object] = {}  # one engine per judge model for the whole stage

        def judge_engine(model: str, who: str):
            return engines[model] if model in engines else engines.setdefault(model, ctx.judge_engine(model, who))

        judge = (judge_engine(cfg.annotate.claim_judge, "annotate.claim_judge")
                 if cfg.annotate.gates and cfg.annotate.claim_judge else None)
        note_judge = cfg.annotate.note_judge if cfg.annotate.gates else ""
        for member in ctx.ensemble.annotators:
            task = AnnotateTask(ctx.prompts, cfg, ctx.generation, member.name, member.persona, member.temperature,
                                member.few_shot)
            rows = annotate_passages(task, ctx.passages, member.best_of or cfg.annotate.best_of,
                                     ctx.engine(member.backend), ctx.run)
            if judge is not None:
                judge_claims(rows, ctx.text(), judge, ctx.prompts, cfg, ctx.run)
            if note_judge and note_sentences(rows, ctx.text()):  # loaded only where there is a sentence to ask
                judge_notes(rows, ctx.text(), judge_engine(note_judge, "annotate.note_judge"), ctx.prompts, cfg,
                            ctx.run)
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
             annotator: str = "annotator", few_shot: bool = True, best_of: int | None = None) -> list[AnnotationRow]:
    """Annotate passages with one cached engine outside a build (benches, notebooks, tests)."""
    task = AnnotateTask(prompts, config, generation, annotator, persona, temperature, few_shot)
    return annotate_passages(task, passages, best_of or config.annotate.best_of, engine, advance=on_progress)


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


def judge_notes(rows: list[AnnotationRow], texts: dict[str, str], engine, prompts: Prompts, cfg: RatchetConfig,
                run=None) -> None:
    """The note judge, after the rules: every sentence of every note (weak reasoning,
    uncertainties, ethical stakes) and of the reflection an accepted annotation still holds is
    asked of the grounding judge (the claim judge's question) in one batch. A note sentence at or
    above annotate.note_threshold is cut, and a note left without a sentence goes; a reflection
    sentence at or above annotate.prose_threshold is cut, but a sentence the gates gave back as
    the passage's (faithfulness.attributed) is the passage's own and is not asked. A reflection
    left without a sentence is rebuilt from its kept claims' quotes, each said as the passage's:
    right by construction, where a veto would lose the verified claims (on 91 audited
    reflections, 56 of 81 right against 49 with the prose unjudged and 39 of 62 with a veto:
    docs/faithfulness.md, bench/note_judge.py). Where the judge abstains (judges.abstain_below)
    or gives no answer, the sentence stays; an abstention sends its annotation to a person
    (audit.note_judge_escalations)."""
    from ..judges import EntailmentTask

    asked = note_sentences(rows, texts)
    if not asked:
        return
    task, items = EntailmentTask(prompts, cfg), [(texts[r.passage_id], sentence) for r, _, _, _, sentence in asked]
    outcomes = run(task, items, engine) if run else run_task(task, items, engine)
    cut: set[tuple[int, str, int, int]] = set()  # (row, field, note, sentence) by position: a repeat is its own
    for (row, key, i, j, sentence), outcome in zip(asked, outcomes):
        p = round(outcome.graded.p("no"), 4) if outcome.graded else None
        threshold = cfg.annotate.prose_threshold if key == "reflection" else cfg.annotate.note_threshold
        verdict = ("unjudged" if p is None else "abstain" if cfg.judges.abstains(p) else
                   "cut" if p >= threshold else "kept")
        row.note_checks = (row.note_checks or []) + [{"field": key, "text": sentence, "p_unsupported": p,
                                                      "verdict": verdict}]
        if verdict == "cut":
            cut.add((id(row), key, i, j))
    for row in {id(r): r for r, *_ in asked}.values():
        for key in faithfulness.NOTE_FIELDS:
            notes = []
            for i, note in enumerate(row.record.get(key) or []):
                written = faithfulness.sentences(note)
                left = [s for j, s in enumerate(written) if (id(row), key, i, j) not in cut]
                gone = len(written) - len(left)
                if left:
                    notes.append(" ".join(left))
                row.dropped_notes = (row.dropped_notes or 0) + (gone if left else 1)  # as the rules count
            if key in row.record:
                row.record[key] = notes
        written = faithfulness.sentences(row.record.get("reflection") or "")
        left = [s for j, s in enumerate(written) if (id(row), "reflection", 0, j) not in cut]
        row.dropped_notes = (row.dropped_notes or 0) + len(written) - len(left)
        if not left:
            left = [faithfulness.quotes_said(row.record["claims"], injection.orders(texts[row.passage_id]))]
            row.note_checks.append({"field": "reflection", "text": left[0], "p_unsupported": None,
                                    "verdict": REBUILT})
        row.record["reflection"] = " ".join(left)
        if not row.record["reflection"]:  # every quote holds an order of its passage: nothing to say
            row.status, row.record, row.reason = "rejected", None, f"{faithfulness.PROSE_VETO}: every sentence cut"


REBUILT = "rebuilt"  # the reflection, every sentence cut, rebuilt from its claims' quotes (note_checks, rewrite)
REWRITTEN = "rewritten"  # a rewrite verdict: the writer's reflection asked again passed the gates


def note_sentences(rows: list[AnnotationRow], texts: dict[str, str]) -> list[tuple[AnnotationRow, str, int, int, str]]:
    """(row, field, note, sentence index, sentence) of every sentence of the accepted rows'
    notes and reflection the note judge is asked of: all but those given back as the passage's."""
    def notes(r: AnnotationRow, key: str) -> list[str]:
        return [r.record.get("reflection") or ""] if key == "reflection" else list(r.record.get(key) or [])

    return [(r, key, i, j, sentence) for r in rows if r.status == "accepted"
            for key in (*faithfulness.NOTE_FIELDS, "reflection") for i, note in enumerate(notes(r, key))
            for j, sentence in enumerate(faithfulness.sentences(note))
            if not faithfulness.said_by(sentence, texts[r.passage_id])]


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
    samples = [c for r in rows for c in r.candidates or [{"attempts": r.attempts, "status": r.status}]]
    attempts = sum(c["attempts"] for c in samples)
    reasons = Counter((r.reason or "").split(":")[0] for r in rows if r.status == "rejected")
    return {"annotations": len(rows), "accepted": sum(r.status == "accepted" for r in rows),
            "rejected": sum(r.status == "rejected" for r in rows), "rejection_reasons": dict(sorted(reasons.items())),
            "attempts": attempts,
            "truncation_rate": round(sum(r.truncated for r in rows) / attempts, 4) if attempts else 0.0,
            "trimmed_strings": sum(r.trimmed or 0 for r in rows if r.status == "accepted"),
            "faithfulness": faithfulness_metrics(rows),
            **({"best_of": best_of_metrics(rows)} if len(samples) > len(rows) else {})}


def best_of_metrics(rows: list[AnnotationRow]) -> dict:
    """What sampling more than one candidate did: samples, how many passed every gate, and the
    kept rows that are not the first sample (the passages the extra samples changed)."""
    samples = [c for r in rows for c in r.candidates or []]
    return {"samples": len(samples), "samples_accepted": sum(c["status"] == "accepted" for c in samples),
            "kept_not_first": sum(r.status == "accepted" and (r.candidate or 0) > 0 for r in rows),
            "rescued": sum(r.status == "accepted" and r.candidates[0]["status"] != "accepted"
                           for r in rows if r.candidates)}


def faithfulness_metrics(rows: list[AnnotationRow]) -> dict:
    """What the gates did to the accepted annotations (the last attempt of each): claims kept,
    claims dropped by reason, notes dropped (by the rules and the note judge), note sentences the
    note judge was asked of and cut; and the vetoes that rejected annotations."""
    checks = [c for r in rows if r.status == "accepted" for c in r.claim_checks or []]
    judged = [c for r in rows if r.status == "accepted" for c in r.note_checks or []]  # the note judge's
    kept = sum(c["verdict"] == "supported" for c in checks)
    dropped = Counter(c["reason"].split(":")[0] for c in checks if c["verdict"] != "supported")
    vetoes = Counter((r.reason or "").split(":")[0] for r in rows if r.status == "rejected"
                     and (r.reason or "").split(":")[0] in (*faithfulness.VETOES, injection.VETO))
    def noted(mark: str) -> int:  # kept claims whose check notes what the gate changed
        return sum(c["verdict"] == "supported" and f"{mark}:" in (c["reason"] or "") for c in checks)

    return {"claims_written": len(checks), "claims_kept": kept, "claims_dropped": dict(sorted(dropped.items())),
            "quotes_rechosen": noted(faithfulness.REQUOTED), "claims_unwrapped": noted(faithfulness.UNWRAPPED),
            "verified_share": round(kept / len(checks), 4) if checks else None,
            "notes_dropped": sum(r.dropped_notes or 0 for r in rows if r.status == "accepted"),
            "notes_judged": sum(c["verdict"] != REBUILT for c in judged),
            "notes_cut_by_judge": sum(c["verdict"] == "cut" for c in judged),
            "reflections_rebuilt": sum(c["verdict"] == REBUILT for c in judged),
            "reflections_refused": sum(bool(r.rewrite) for r in rows if r.status == "accepted"),
            "reflections_rewritten": sum((r.rewrite or {}).get("verdict") == REWRITTEN for r in rows
                                         if r.status == "accepted"),
            "vetoed": dict(sorted(vetoes.items()))}


def injection_metrics(rows: list[AnnotationRow], passages: list[Passage]) -> dict:
    """Passages that give orders (builder/injection.py), the annotations of them kept, and those
    the injection gate vetoed (their last attempt carried an order out)."""
    giving = {p.passage_id for p in passages if injection.orders(p.text)}
    return {"passages_with_orders": len(giving),
            "kept": sum(r.status == "accepted" and r.passage_id in giving for r in rows),
            "vetoed": sum(r.status == "rejected" and (r.reason or "").startswith(injection.VETO) for r in rows)}
