"""The ratchet: generation N+1 annotates the same passages as generation N, and a new reflection
replaces the parent's only if a fixed reference panel scores it at least as well and prefers it
head to head by more than 0.5 + margin (without pairwise comparison: only if it scores higher).

The panel is frozen when a workspace builds its first generation (by default: every critic
of the ensemble then, the generation-0 models) and recorded in DuckDB with each member's
engine, sampling and model hash; later generations load it from there, whatever the config
says by then, and refuse to run if a panel model file changed. Each generation re-scores both
the parent's reflection and the new one with that panel (fixed seed and sampling, so the
parent's score is a cache hit), so a drifting judge cannot fake progress.

Score of a reflection = the weighted mean over panel members of P(survives) + 0.5 P(revise)
(critiques without a valid answer do not count; no valid critique at all scores 0 in the
means). Each member's weight is frozen with the panel: its measured validity then
(`ratchet validity`, the critics' vote weight); a member at chance weighs 0 and is never asked.
A panel with no informative member scores by the grounding check alone (say so). Per
passage the final score never falls, so the generation's mean over its passages never falls:
monotone by construction.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, replace

from ..backends.base import Backend
from ..config import RatchetConfig
from ..ensemble import Ensemble, Member
from ..prompts import Prompts
from ..structured import Outcome
from ..tables import Json, Table, doc
from .base import BuildContext, JudgingTask, RatchetError, Sampling, Stage, run_task
from .. import verifier
from ..verifier import GroundingVerifier
from .scrutinize import (PRIOR_WEIGHT, VERDICT_POINTS, CritiqueTask, Task, content_free_record, model_hash,
                         stage_weights, verifier_row)



@dataclass
class PanelMember:
    name: str
    persona: str
    family: str
    engine: Json = doc("the engine config it runs with")
    sampling: Json = doc("temperature, top_p, repeat_penalty, max_tokens, seed, retries: fixed forever")
    model_hash: str = doc("sha256 of the model file: a changed file is refused")
    since_generation: int = 0
    questions: Json | None = doc("what it is asked with: sha256 of each critique/compare prompt file, its persona "
                                 "text and schema, the engine `auto` resolved to, how judgements are read",
                                 default=None, added=True)
    fingerprint: Json | None = doc("a served model (no file to hash): the model id its server reports and its "
                                   "greedy answers to fixed probes, checked again before every scoring",
                                   default=None, added=True)
    weight: float | None = doc("its vote on the panel, frozen with it: its measured validity then (the critics' vote "
                               "weight, `ratchet validity`); 0: not informative, never asked; NULL: a panel frozen "
                               "before weights (every member weighs the same)", default=None, added=True)


PANEL = Table("panel", PanelMember, key=("name",),
              doc="the ratchet's fixed reference panel, frozen by the first generation")


@dataclass
class Reflection:
    """A passage's reflection: the new candidate of this generation or the parent's final one."""
    passage_id: str
    annotator: str
    generation: int  # the generation that wrote it
    record: dict

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@dataclass
class RatchetRow:
    generation: int
    passage_id: str
    decision: str = doc("new | replaced | unchanged | carried | tie (the parent kept) | none")
    annotator: str | None = doc("author of the final reflection")
    source_generation: int | None = doc("the generation that wrote it (older when carried forward)")
    record: Json | None = doc("the final reflection (schemas/annotation.schema.json)")
    reflection: str | None = doc("the record rendered with prompts/reflection.jinja (the sft text)")
    score: float | None = doc("its panel score (0..1)")
    parent_annotator: str | None
    parent_generation: int | None
    parent_score: float | None = doc("the parent's reflection, re-scored by the panel now")
    new_annotator: str | None
    new_score: float | None = doc("this generation's candidate (converged, not vetoed)")
    reflection_key: str | None = doc("hash of the final record")
    reason: str
    preference: float | None = doc("the panel's pairwise P(new is better than the parent), both orders averaged",
                                   default=None, added=True)
    vetoed: bool | None = doc("the kept reflection, carried from a parent, was vetoed by this generation's consent "
                              "judges: it stays the passage's reflection but is left out of the sft split",
                              default=None, added=True)


RATCHET = Table("ratchet", RatchetRow, key=("generation", "passage_id"),
                doc="the reflection each passage keeps in a generation, and why")


@dataclass
class Decision:
    passage_id: str
    decision: str  # new | replaced | unchanged | carried | tie | none
    final: Reflection | None
    score: float | None
    parent: Reflection | None
    parent_score: float | None
    new: Reflection | None
    new_score: float | None
    reason: str
    preference: float | None = None  # the panel's pairwise P(new is better)


# ---------------------------------------------------------------- the panel


# What a panel member is asked with. A change to any of them changes the panel's judgements as
# surely as another model file would, so they are frozen with it.
PANEL_PROMPT_FILES = ("critique.system.jinja", "critique.user.jinja", "critique.examples.jsonl", "reflection.jinja",
                      "compare.system.jinja", "compare.user.jinja")
PANEL_SCHEMAS = ("critique", "compare")
# Fixed probes for a served model, answered greedily: the same model gives the same answers.
FINGERPRINT_PROBES = ("Complete the sentence with one word: The sky on a clear day is",
                      "What is 17 + 25? Answer with the number only.",
                      "Name the opposite of 'cold' in one word.")


def panel_questions(persona: str, prompts: Prompts, cfg: RatchetConfig, backend: Backend | None) -> dict:
    """What a panel member is asked with (without `engine` when no backend is loaded yet)."""
    from ..cache import sha256
    from ..resources import load_schema

    files = prompts.hashes([persona])
    return {**{n: files[n] for n in (*PANEL_PROMPT_FILES, f"personas/{persona}.txt")},
            **{f"{s}.schema.json": sha256(load_schema(s)) for s in PANEL_SCHEMAS},
            **({"engine": backend.describe().get("backend") or type(backend).__name__} if backend else {}),
            "decide_by": cfg.judgements.decide_by}


def served_fingerprint(backend: Backend) -> dict | None:
    """A model without a file to hash (an OpenAI-compatible server): the model id its server
    reports and its greedy answers to FINGERPRINT_PROBES, asked of the engine itself (never the
    cache, which would only repeat the first answers)."""
    if not backend.served:
        return None
    from ..backends.base import Request

    requests = [Request(messages=({"role": "user", "content": q},), max_tokens=8, temperature=0.0, seed=0)
                for q in FINGERPRINT_PROBES]
    answers = [r.text.strip() if r.finish_reason != "error" else f"error: {r.error}" for r in backend.generate(requests)]
    reported = getattr(backend, "reported_model", None)
    return {"reported_model": reported() if callable(reported) else None, "answers": answers}


def frozen_differences(then: dict | None, now: dict | None) -> list[str]:
    then, now = then or {}, now or {}
    return sorted(k for k in {*then, *now} if then.get(k) != now.get(k))


def choose_panel(cfg: RatchetConfig, ensemble: Ensemble, generation: int = 1,
                 weights: dict[str, float] | None = None) -> list[PanelMember]:
    """The panel a workspace's first generation freezes: ratchet.panel, or every critic, each
    with its vote weight (`weights`, the critics' measured validity; unmeasured: PRIOR_WEIGHT)."""
    names = cfg.ratchet.panel or [m.name for m in ensemble.critics] + [v.name for v in ensemble.verifiers]
    by_name = {m.name: m for m in [*ensemble.members, *ensemble.verifiers]}
    configs = {m.display_name: m for m in cfg.ensemble.members}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise RatchetError(f"ratchet.panel: no ensemble member named {', '.join(unknown)} "
                           f"(members: {', '.join(by_name)})")
    if not names:
        raise RatchetError("ratchet.panel is empty and the ensemble has no critic: name at least one member")
    s = cfg.sampling
    weigh = lambda name: round((weights or {}).get(name, PRIOR_WEIGHT), 4)
    panel = []
    for name in names:
        member = by_name[name]
        if member.family == verifier.KIND:  # no model: its identity is the version of its check
            panel.append(PanelMember(name, member.persona, member.family, {"kind": verifier.KIND}, {},
                                     verifier.VERSION, generation, weight=weigh(name)))
            continue
        temperature = s.temperature if member.temperature is None else member.temperature
        panel.append(PanelMember(
            name, member.persona, member.family, configs[name].engine(cfg.annotator).model_dump(),
            {"temperature": temperature, "top_p": s.top_p, "repeat_penalty": s.repeat_penalty,
             "max_tokens": cfg.ensemble.critic_max_tokens, "seed": s.seed, "retries": cfg.annotate.retries},
            model_hash(member.backend), generation, weight=weigh(name)))  # questions: recorded by check_frozen
    return panel


def load_or_freeze_panel(con, cfg: RatchetConfig, ensemble: Ensemble, generation: int,
                         weights=lambda: {}) -> list[PanelMember]:
    """The frozen panel, or the one this (first) generation freezes, weighed by `weights()`."""
    rows = PANEL.read(con, "true ORDER BY name")
    if rows:
        return rows
    panel = choose_panel(cfg, ensemble, generation, weights())
    PANEL.insert(con, panel)
    return panel


def member_weight(p: PanelMember) -> float:
    """A member's frozen weight; a panel frozen before weights: every member the same."""
    return PRIOR_WEIGHT if p.weight is None else p.weight


def voting_members(panel: list[PanelMember]) -> tuple[list[PanelMember], str | None]:
    """The members asked (weight above 0), and why the panel falls back when none is informative:
    then the grounding check scores alone (with gates on, ties keep the parent), or, with no
    grounding check on the panel, every member weighs the same as before weights existed."""
    informative = [p for p in panel if member_weight(p) > 0]
    if informative:
        return informative, None
    checks = [p for p in panel if p.engine.get("kind") == verifier.KIND]
    if checks:
        return [replace(p, weight=1.0) for p in checks], ("no informative panel member (every frozen weight 0): "
                                                          "scored by the grounding check")
    return [replace(p, weight=PRIOR_WEIGHT) for p in panel], ("no informative panel member and no grounding check on "
                                                              "the panel: every member weighs the same")


def open_panel(panel: list[PanelMember], ensemble: Ensemble, stack, con, prompts: Prompts,
               cfg: RatchetConfig) -> list[tuple[PanelMember, Member, Backend]]:
    """Each panel member with a loaded engine (a member's, or one loaded for this build), after
    checking that nothing it is asked with changed since the panel was frozen. A panel frozen
    before its questions were recorded gets them recorded now (and is held to them from then on)."""
    from ..backends import registry

    out = []
    for p in panel:
        if p.engine.get("kind") == verifier.KIND:
            if p.model_hash != verifier.VERSION:
                raise RatchetError(f"reference panel member {p.name}: the grounding check changed since the panel was "
                                   f"frozen ({p.model_hash}, now {verifier.VERSION}); start a new workspace")
            out.append((p, GroundingVerifier(p.name), None))
            continue
        backend = ensemble.load(registry.parse_stored(p.engine), stack, f"reference panel member {p.name}")
        if model_hash(backend) != p.model_hash:
            raise RatchetError(
                f"reference panel member {p.name}: its model changed since the panel was frozen "
                f"(was {p.model_hash[:12]}…, now {model_hash(backend)[:12]}…); the panel must stay fixed for "
                "the ratchet to mean anything: restore the file, or start a new workspace")
        check_frozen(p, backend, con, prompts, cfg)
        member = Member(p.name, p.persona, ["critique"], p.sampling["temperature"], backend)
        out.append((p, member, backend))
    return out


def refuse_changed_questions(p: PanelMember, questions: dict) -> None:
    changed = frozen_differences({k: v for k, v in p.questions.items() if k in questions}, questions)
    if changed:
        raise RatchetError(f"reference panel member {p.name}: what it is asked with changed since the panel was frozen "
                           f"(changed: {', '.join(changed)}); the panel must stay fixed for the ratchet to mean "
                           "anything: restore them, or start a new workspace (`ratchet panel` shows the frozen panel)")


def check_frozen(p: PanelMember, backend: Backend, con, prompts: Prompts, cfg: RatchetConfig) -> None:
    """Refuse to score with a panel member whose questions or served model changed, naming what.
    What is not recorded yet (the build that freezes the panel, or a panel an older builder froze)
    is recorded now, once, and held to from then on."""
    questions = panel_questions(p.persona, prompts, cfg, backend)
    fingerprint = served_fingerprint(backend)  # None unless served: asks the probes once per build
    if (p.questions is None) or (p.fingerprint is None and fingerprint is not None):
        p.questions, p.fingerprint = p.questions or questions, p.fingerprint or fingerprint
        if con is not None:
            con.execute("UPDATE panel SET questions = ?, fingerprint = ? WHERE name = ?",
                        [json.dumps(p.questions), json.dumps(p.fingerprint) if p.fingerprint else None, p.name])
    refuse_changed_questions(p, questions)
    changed = frozen_differences(p.fingerprint, fingerprint)
    if changed:
        raise RatchetError(f"reference panel member {p.name}: the served model answers otherwise since the panel was "
                           f"frozen (changed: {', '.join(changed)}: {p.fingerprint} → {fingerprint}); point it at the "
                           "same model, or start a new workspace (`ratchet panel` shows the frozen panel)")


def panel_sampling(sampling: dict) -> Sampling:
    """A panel critic samples as frozen, whatever the config says today."""
    return Sampling(sampling["max_tokens"], sampling["temperature"], sampling["top_p"], sampling["repeat_penalty"],
                    sampling["seed"], sampling["retries"], sampling.get("at_bound", "trim"))


@dataclass
class PanelVerdict:
    generation: int
    passage_id: str
    reflection: str = doc("hash of the scored record (Reflection.key)")
    critic: str
    verdict: str | None = doc("survives | revise | reject; NULL: no valid critique")
    call_key: str | None
    score: float | None = doc("P(survives) + 0.5 P(revise) under the deciding distribution", default=None, added=True)
    probs: Json | None = doc("the verdict's distribution as read", default=None, added=True)
    calibrated: Json | None = doc("probs divided by the content-free baseline", default=None, added=True)
    abstain: bool | None = doc("the member was too unsure of its verdict (judges.abstain_below): no point in the "
                               "score", default=False, added=True)


PANEL_VERDICTS = Table("panel_verdicts", PanelVerdict, doc="every verdict behind a panel score")


def score(reflections: list[Reflection], text: dict[str, str], panel, prompts: Prompts, generation: int,
          advance=None, judging=None, run=run_task, judges=None) -> tuple[dict[tuple[str, str], float | None],
                                                                         list[PanelVerdict], int, int]:
    """{(passage_id, reflection key): score}, every panel verdict behind the scores, the
    attempts they took, and how many scores were not asked because the panel member wrote the
    reflection itself (a member never scores its own: no self-preference). A verdict a member
    was too unsure of (`judges`: config.JudgesConfig) is stored and is no point in the score, as
    a critic's is no vote; a reflection no member could score has no score (it counts as 0)."""
    unique = list({(r.passage_id, r.key): r for r in reflections}.values())
    verdicts: list[PanelVerdict] = []
    attempts = skipped = 0
    for p, member, engine in panel:
        others = [r for r in unique if r.annotator != p.name]
        skipped += len(unique) - len(others)
        if advance and len(others) < len(unique):
            advance(len(unique) - len(others))
        tasks = [Task(r.passage_id, text[r.passage_id], r.key, r.record) for r in others]
        if engine is None:  # the grounding verifier: no model call
            rows = [verifier_row(generation, p.name, t) for t in tasks]
            verdicts += [PanelVerdict(generation, c.passage_id, c.annotator, p.name, c.verdict, None, c.score, c.probs,
                                      None, False) for c in rows]
            if advance:
                advance(len(rows))
            continue
        task = CritiqueTask(prompts, panel_sampling(p.sampling), generation, member,
                            label=f"ratchet panel ({p.name})", judging=judging, judges=judges)
        results = run(task, tasks, engine, advance)
        verdicts += [PanelVerdict(generation, c.passage_id, c.annotator, p.name, c.verdict, c.call_key, c.score, c.probs,
                                  c.calibrated, c.abstain) for c in results]
        attempts += sum(c.attempts for c in results)
    weight = {p.name: member_weight(p) for p, _, _ in panel}
    points: dict[tuple[str, str], list[tuple[float, float]]] = {(r.passage_id, r.key): [] for r in unique}
    for v in verdicts:
        if v.verdict in VERDICT_POINTS and not v.abstain:
            points[(v.passage_id, v.reflection)].append(
                (weight[v.critic], v.score if v.score is not None else VERDICT_POINTS[v.verdict]))
    return {k: weighted_mean(x) for k, x in points.items()}, verdicts, attempts, skipped


def weighted_mean(points: list[tuple[float, float]]) -> float | None:
    """Of (weight, value) pairs; None without any (a panel of equal weights: the plain mean)."""
    total = sum(w for w, _ in points)
    return round(sum(w * x for w, x in points) / total, 4) if total > 0 else None


# ---------------------------------------------------------------- the rule


def decide(passage_ids: list[str], new: dict[str, Reflection], parents: dict[str, Reflection],
           scores: dict[tuple[str, str], float | None], why_no_new: dict[str, str],
           preference: dict[str, float] | None = None, margin: float = 0.0) -> list[Decision]:
    """Per passage: the new reflection replaces the parent's only if the panel scores it at
    least as well (a reflection without a valid panel score counts as 0) and, with `preference`
    (the panel's pairwise P(new is better), asked in both orders), prefers it by more than
    0.5 + margin; without pairwise preferences, only if it scores strictly higher. Anything
    else keeps the parent: a tie is not an improvement. The score per passage never falls."""
    out = []
    for pid in passage_ids:
        n, p = new.get(pid), parents.get(pid)
        ns = scores.get((pid, n.key)) if n else None
        ps = scores.get((pid, p.key)) if p else None
        pref = (preference or {}).get(pid) if preference is not None else None
        if p is None and n is None:
            out.append(Decision(pid, "none", None, None, None, None, None, None, why_no_new.get(pid, "no reflection")))
        elif p is None:
            out.append(Decision(pid, "new", n, ns, None, None, n, ns, "first reflection of this passage"))
        elif n is None:
            out.append(Decision(pid, "carried", p, ps, p, ps, None, None,
                                f"parent carried forward: {why_no_new.get(pid, 'no new reflection')}"))
        elif n.key == p.key:
            out.append(Decision(pid, "unchanged", p, ps, p, ps, n, ns, "the new reflection is the parent's"))
        elif (ns or 0.0) < (ps or 0.0):
            out.append(Decision(pid, "carried", p, ps, p, ps, n, ns,
                                f"parent carried forward: new scored {_fmt(ns)} < parent {_fmt(ps)}", pref))
        elif preference is not None and pref is not None:
            if pref > 0.5 + margin:
                out.append(Decision(pid, "replaced", n, ns, p, ps, n, ns, f"new scored {_fmt(ns)} >= parent "
                                    f"{_fmt(ps)} and the panel prefers it head to head ({pref:.2f} > {0.5 + margin:.2f})",
                                    pref))
            else:
                out.append(Decision(pid, "tie", p, ps, p, ps, n, ns, f"parent kept: the panel does not prefer the new "
                                    f"one head to head ({pref:.2f} <= {0.5 + margin:.2f})", pref))
        elif (ns or 0.0) > (ps or 0.0):
            out.append(Decision(pid, "replaced", n, ns, p, ps, n, ns, f"new scored {_fmt(ns)} > parent {_fmt(ps)}"))
        else:
            out.append(Decision(pid, "tie", p, ps, p, ps, n, ns, f"parent kept: a tie ({_fmt(ns)} = {_fmt(ps)})"))
    return out


def _fmt(x: float | None) -> str:
    return "none" if x is None else f"{x:.2f}"


def parent_reflections(con, generation: int) -> dict[str, Reflection]:
    """The final reflection per passage of generation - 1 (empty for the first generation)."""
    rows = con.execute("""SELECT passage_id, annotator, source_generation, record FROM ratchet
                          WHERE generation = ? AND record IS NOT NULL""", [generation - 1]).fetchall()
    return {pid: Reflection(pid, a, g, json.loads(r)) for pid, a, g, r in rows}


def consent_to_parents(ctx: BuildContext, decisions: list[Decision]) -> set[str]:
    """Everything bound for this generation's sft split passes this generation's consent
    judges, the reflections carried forward from a parent too (the candidates passed them in
    the consent stage). Their answers join the consents table (example id PASSAGE@gN, N the
    generation that wrote the reflection; an unchanged judge answers from the cache). Returns
    the passages whose kept reflection was vetoed: the ratchet keeps it as the passage's
    reflection (the score per passage never falls), the sft split leaves it out."""
    from .consent import CONSENTS, DRIFT_EVENTS, Example, ask_judges, consent_row, drift_rows

    kept = [d for d in decisions if d.final is not None and d.final.generation < ctx.generation]
    if not kept or not ctx.cfg.consent.judges:
        return set()
    text = ctx.text()
    examples = [Example("sft", f"{d.passage_id}@g{d.final.generation}", "PASSAGE", text[d.passage_id], "REFLECTION",
                        ctx.prompts.reflection(d.final.record)) for d in kept]
    consents, _ = ask_judges(ctx, examples)
    CONSENTS.insert(ctx.con, [consent_row(ctx.generation, c) for c in consents])
    DRIFT_EVENTS.insert(ctx.con, drift_rows(ctx.generation, consents))
    return {c.example_id.split("@")[0] for c in consents if c.veto}


def store(con, generation: int, decisions: list[Decision], verdicts: list[PanelVerdict], prompts: Prompts,
          vetoed: set[str] = frozenset()) -> None:
    """The decisions, with each final reflection rendered once here so that compiling a
    generation is SQL alone."""
    def row(d: Decision) -> RatchetRow:
        f = d.final
        return RatchetRow(generation, d.passage_id, d.decision, f.annotator if f else None, f.generation if f else None,
                          f.record if f else None, prompts.reflection(f.record) if f else None, d.score,
                          d.parent.annotator if d.parent else None, d.parent.generation if d.parent else None,
                          d.parent_score, d.new.annotator if d.new else None, d.new_score, f.key if f else None,
                          d.reason, d.preference, d.passage_id in vetoed)

    RATCHET.replace_generation(con, generation, [row(d) for d in decisions])
    PANEL_VERDICTS.replace_generation(con, generation, verdicts)


def metrics(con, generation: int) -> dict:
    """This generation's ratchet figures (the view ratchet_by_generation), the history, and the
    mean change of the per-passage score from the parent generation with a bootstrap 95%
    interval over passages."""
    cols = ["generation", "passages", "with_reflection", "mean_score", "with_parent", "replaced", "carried",
            "unchanged", "new", "replacement_rate", "carried_rate", "ties"]
    rows = con.execute(f"SELECT {', '.join(cols)} FROM ratchet_by_generation WHERE generation <= ? ORDER BY generation",
                       [generation]).fetchall()
    history = [dict(zip(cols, r)) for r in rows]
    if not history:
        return {"history": []}
    return {**history[-1], "history": history, "score_change": score_change(con, generation)}


def score_change(con, generation: int, resamples: int = 2000, seed: int = 0) -> dict | None:
    """Mean over passages of (score now - score in the parent generation), 0 for a passage
    without a reflection, with a percentile bootstrap 95% interval (fixed seed: reproducible)."""
    if generation < 2:
        return None
    import numpy as np

    from ..stats import bootstrap

    rows = con.execute("""SELECT coalesce(b.score, 0) - coalesce(a.score, 0)
                          FROM (SELECT * FROM ratchet WHERE generation = $b) b
                          LEFT JOIN (SELECT * FROM ratchet WHERE generation = $a) a USING (passage_id)""",
                       {"a": generation - 1, "b": generation}).fetchall()
    diffs = np.array([r[0] for r in rows], dtype=float)
    if diffs.size == 0:
        return None
    low, high = bootstrap(np.mean, diffs, n=resamples, seed=seed) or (float(diffs[0]),) * 2
    return {"mean": round(float(diffs.mean()), 4), "low": low, "high": high, "passages": int(diffs.size)}


def diff(con, a: int, b: int) -> list[dict]:
    """Per passage of generation b: how its final reflection relates to generation a's, and why."""
    rows = con.execute("""
        SELECT coalesce(rb.passage_id, ra.passage_id) AS passage_id, left(p.text, 70) AS passage,
               ra.reflection_key AS key_a, ra.annotator AS annotator_a, ra.source_generation AS gen_a, ra.score AS score_a,
               rb.reflection_key AS key_b, rb.annotator AS annotator_b, rb.source_generation AS gen_b, rb.score AS score_b,
               rb.decision, rb.reason,
               EXISTS (SELECT 1 FROM consents c WHERE c.generation = $b AND c.split = 'sft'
                       AND c.example_id = rb.passage_id AND c.veto) AS vetoed
        FROM (SELECT * FROM ratchet WHERE generation = $a) ra
        FULL JOIN (SELECT * FROM ratchet WHERE generation = $b) rb USING (passage_id)
        LEFT JOIN passages p ON p.passage_id = coalesce(rb.passage_id, ra.passage_id)
        ORDER BY passage_id""", {"a": a, "b": b}).fetchall()
    cols = ["passage_id", "passage", "key_a", "annotator_a", "gen_a", "score_a", "key_b", "annotator_b", "gen_b",
            "score_b", "decision", "reason", "vetoed"]
    out = []
    for row in rows:
        r = dict(zip(cols, row))
        if r["key_a"] is None and r["key_b"] is None:
            r["change"] = "none"
        elif r["key_a"] is None:
            r["change"] = "newly converged"
        elif r["key_b"] is None:
            r["change"] = "dropped"
        elif r["key_a"] == r["key_b"]:
            r["change"] = "kept"
        else:
            r["change"] = "replaced"
        if r["vetoed"]:
            r["reason"] = f"{r['reason']} (the new reflection was vetoed by a consent judge)"
        out.append(r)
    return out


# ---------------------------------------------------------------- the pairwise test


@dataclass
class Pairing:
    """Two reflections of one passage, in the order shown (A first)."""
    passage_id: str
    passage: str
    a: dict
    b: dict


class CompareTask(JudgingTask[Pairing, Outcome]):
    """A panel member says which of two reflections describes the passage more accurately
    (schemas/compare.schema.json), read as P(A); calibrated with two empty reflections, which
    is the member's preference for a position."""
    schema_name = "compare"
    field, choices = "better", ("A", "B")

    def __init__(self, prompts: Prompts, sampling: Sampling, member, judging=None):
        super().__init__(sampling, label=f"ratchet panel, pairwise ({member.name})")
        self.prompts, self.member, self.judging = prompts, member, judging

    def format_input(self, x: Pairing) -> tuple[dict, ...]:
        return self.prompts.compare_messages(x.passage, x.a, x.b, persona=self.member.persona)

    def format_output(self, x: Pairing, outcome: Outcome) -> Outcome:
        return outcome

    def content_free(self, text: str) -> Pairing:
        empty = content_free_record(text)
        return Pairing("content-free", text, empty, empty)


@dataclass
class Comparison:
    generation: int
    passage_id: str
    critic: str
    candidate: str = doc("the new reflection's key")
    parent: str = doc("the parent reflection's key")
    p_first: float | None = doc("P(candidate better) with the candidate shown first (A)")
    p_second: float | None = doc("P(candidate better) with the candidate shown second (B)")
    preference: float | None = doc("their mean: the member's P(candidate better), position bias cancelled")
    consistent: bool | None = doc("the two orders chose the same reflection")
    call_keys: Json | None
    abstain: bool | None = doc("the preference was too close to call (max(p, 1 - p) below judges.abstain_below): "
                               "not in the panel's preference", default=False, added=True)


PANEL_COMPARISONS = Table("panel_comparisons", Comparison, key=("generation", "passage_id", "critic"),
                          doc="the ratchet panel's pairwise test of each candidate against its parent, in both orders")


def compare(pairs: list[tuple[Reflection, Reflection]], text: dict[str, str], panel, prompts: Prompts,
            generation: int, advance=None, judging=None, run=run_task, judges=None) -> list[Comparison]:
    """Each (candidate, parent) to every panel member, in both orders. The grounding verifier
    compares the shares of grounded claims (1, 0.5 or 0) and never abstains; a model member
    whose preference is too close to call (`judges`: config.JudgesConfig) abstains."""
    out = []
    for p, member, engine in panel:
        own = [(n, o) for n, o in pairs if p.name in (n.annotator, o.annotator)]  # no self-preference
        if advance and own:
            advance(2 * len(own))
        pairs_ = [(n, o) for n, o in pairs if p.name not in (n.annotator, o.annotator)]
        if engine is None:
            for new, old in pairs_:
                share = [verifier.check(text[new.passage_id], r.record).share for r in (new, old)]
                pref = 1.0 if share[0] > share[1] else 0.0 if share[0] < share[1] else 0.5
                out.append(Comparison(generation, new.passage_id, p.name, new.key, old.key, pref, pref, pref, True, None,
                                      False))
            if advance:
                advance(2 * len(pairs_))
            continue
        if not pairs_:
            continue
        task = CompareTask(prompts, panel_sampling(p.sampling), member, judging)
        items = [Pairing(n.passage_id, text[n.passage_id], n.record, o.record) for n, o in pairs_]
        items += [Pairing(n.passage_id, text[n.passage_id], o.record, n.record) for n, o in pairs_]
        outcomes = run(task, items, engine, advance)
        for i, (new, old) in enumerate(pairs_):
            first, second = outcomes[i], outcomes[len(pairs_) + i]
            p1 = first.graded.p("A") if first.graded else None
            p2 = second.graded.p("B") if second.graded else None
            known = [x for x in (p1, p2) if x is not None]
            consistent = ((p1 > 0.5) == (p2 > 0.5)) if p1 is not None and p2 is not None else None
            preference = sum(known) / len(known) if known else None
            out.append(Comparison(generation, new.passage_id, p.name, new.key, old.key, p1, p2, preference, consistent,
                                  [first.call_key, second.call_key], bool(judges and judges.abstains(preference))))
    return out


def panel_preference(comparisons: list[Comparison], weights: dict[str, float] | None = None) -> dict[str, float]:
    """Per passage: the mean over panel members of P(candidate better), weighted by their
    frozen weights (`weights`: member name -> weight; absent: every member the same). A member
    that abstained has no say; a passage where every member did has no preference (the scores decide)."""
    by: dict[str, list[tuple[float, float]]] = {}
    for c in comparisons:
        if c.preference is not None and not c.abstain:
            by.setdefault(c.passage_id, []).append(((weights or {}).get(c.critic, PRIOR_WEIGHT), c.preference))
    means = {pid: weighted_mean(v) for pid, v in by.items()}
    return {pid: m for pid, m in means.items() if m is not None}


# ---------------------------------------------------------------- the stage


class Ratchet(Stage):
    """The reference panel scores this generation's candidates (converged, not vetoed) and the
    parent's reflections; a candidate replaces the parent's only by the rule of `decide`."""
    name = "ratchet"
    tables = (PANEL, RATCHET, PANEL_VERDICTS, PANEL_COMPARISONS)

    def prepare(self, ctx: BuildContext) -> None:
        """A frozen panel whose prompts, personas, schemas or judgement reading changed is refused
        before any model runs (the engine and a served model's answers are checked once loaded)."""
        for p in PANEL.read(ctx.con, "true ORDER BY name"):
            if p.questions and p.engine.get("kind") != verifier.KIND:
                refuse_changed_questions(p, panel_questions(p.persona, ctx.prompts, ctx.cfg, None))

    def run(self, ctx: BuildContext) -> dict:
        g = ctx.generation
        frozen = load_or_freeze_panel(ctx.con, ctx.cfg, ctx.ensemble, g, lambda: stage_weights(ctx, g))
        voting, fallback = voting_members(frozen)
        if fallback:
            ctx.log.warning("ratchet: %s", fallback)
        panel = [(p, member, ctx.engine(backend) if backend else None) for p, member, backend in
                 open_panel(voting, ctx.ensemble, ctx.stack, ctx.con, ctx.prompts, ctx.cfg)]
        vetoed = {e for e, in ctx.con.execute("SELECT DISTINCT example_id FROM consents WHERE generation = ? AND "
                                              "split = 'sft' AND veto", [g]).fetchall()}
        records = {(pid, author): record for pid, author, record in ctx.accepted}
        new, why_not = {}, {}
        for s in ctx.selections:
            if s.annotator and s.passage_id not in vetoed:
                new[s.passage_id] = Reflection(s.passage_id, s.annotator, g, records[(s.passage_id, s.annotator)])
            else:
                why_not[s.passage_id] = "the new reflection was vetoed by a consent judge" if s.annotator else s.reason
        parents = parent_reflections(ctx.con, g)
        unique = {(r.passage_id, r.key) for r in [*new.values(), *parents.values()]}
        advance = ctx.step("ratchet panel", len(unique) * len(panel))
        scores, verdicts, attempts, self_skipped = score([*new.values(), *parents.values()], ctx.text(), panel,
                                                         ctx.prompts, g, advance, ctx.cfg.judgements, ctx.run,
                                                         ctx.cfg.judges)
        rule = ctx.cfg.ratchet
        pairs = [(new[pid], parents[pid]) for pid in new if pid in parents and new[pid].key != parents[pid].key]
        comparisons = []
        if rule.pairwise and pairs:
            comparisons = compare(pairs, ctx.text(), panel, ctx.prompts, g,
                                  ctx.step("ratchet panel (pairwise)", 2 * len(pairs) * len(panel)), ctx.cfg.judgements,
                                  ctx.run, ctx.cfg.judges)
        preference = panel_preference(comparisons, {p.name: member_weight(p) for p in voting}) \
            if rule.pairwise else None
        decisions = decide(list(dict.fromkeys(p.passage_id for p in ctx.passages)), new, parents, scores, why_not,
                           preference, rule.margin)
        vetoed_parents = consent_to_parents(ctx, decisions)
        store(ctx.con, g, decisions, verdicts, ctx.prompts, vetoed_parents)
        PANEL_COMPARISONS.replace_generation(ctx.con, g, comparisons)
        ctx.log.info("ratchet: %s", dict(Counter(d.decision for d in decisions)))
        judged = [c for c in comparisons if c.consistent is not None]
        asked = len([v for v in verdicts if v.verdict is not None]) + self_skipped
        finals = [d for d in decisions if d.final is not None]
        return {"ratchet": {**metrics(ctx.con, g), "panel": [p.name for p, _, _ in panel],
                            # frozen weights; members at weight 0 are not asked (not informative)
                            "panel_weights": {p.name: member_weight(p) for p in frozen},
                            "panel_not_asked": sorted({p.name for p in frozen} - {p.name for p in voting}),
                            "panel_fallback": fallback,
                            "panel_models": {p.name: p.model_hash for p, _, _ in panel},
                            "panel_attempts": attempts, "pairwise": len(pairs) if rule.pairwise else None,
                            # a member never scores what it wrote: how often that came up, and what it left unscored
                            "self_scores_skipped": self_skipped,
                            "self_score_share": round(self_skipped / asked, 3) if asked else None,
                            "unscored": sum(d.score is None for d in finals),
                            "final_by_member": dict(sorted(Counter(d.final.annotator for d in finals).items())),
                            "parents_vetoed": len(vetoed_parents),
                            # judgements too unsure to count (judges.abstain_below): stored, not counted
                            "abstained": {"scores": sum(bool(v.abstain) for v in verdicts),
                                          "pairwise": sum(bool(c.abstain) for c in comparisons)},
                            "position_consistency": round(sum(c.consistent for c in judged) / len(judged), 3)
                            if judged else None}}
