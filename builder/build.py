"""`ratchet build`: ingest → annotate → scrutinize → converge → audit → compile, for one
generation of one workspace."""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

from .annotate import AnnotationResult, annotate
from .audit import load_secret, model_audit, sample, store_audits, update_reputation
from .cache import CachedBackend, sha256
from . import ratchet
from .compile import compile_generation, compiled_config_hash
from .config import RatchetConfig, model_short_name
from .conscience import (ConscienceError, Framework, Item, Pair, label_distribution, load_framework, load_items,
                         run_conscience)
from .consent import Example, ask, consent_metrics, drift_events
from .converge import PRIOR_WEIGHT, Agreement, Scored, Selection, agreement, score_annotations, select
from .corpus import IngestReport, Passage, ingest
from .ensemble import Ensemble
from .models import ModelNotFound, resolve_model
from .prompts import Prompts
from .scrutinize import CritiqueResult, Task, critique
from .ratchet import RatchetError, Reflection
from .workspace import Workspace, insert_rows, replace_generation, transaction


def build_logger(ws: Workspace, generation: int) -> logging.Logger:
    """One log file per generation in the workspace: a line per model call, no prompt text."""
    ws.logs_dir.mkdir(exist_ok=True)
    log = logging.getLogger(f"ratchet.build.{ws.root}.{generation}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(ws.logs_dir / f"build-gen-{generation:04d}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return log


def store_passages(con, generation: int, passages: list[Passage]) -> None:
    with transaction(con):
        insert_rows(
            con, "INSERT OR IGNORE INTO passages (passage_id, source, position, text, n_tokens) VALUES (?,?,?,?,?)",
            [[p.passage_id, p.source, p.position, p.text, p.n_tokens] for p in passages])
        con.execute("DELETE FROM generation_passages WHERE generation = ?", [generation])
        insert_rows(con, "INSERT INTO generation_passages VALUES (?,?,?,?,?)",
                    [[generation, i, p.passage_id, p.source, p.position] for i, p in enumerate(passages)])


def store_annotations(con, generation: int, annotator: str, results: list[AnnotationResult]) -> None:
    with transaction(con):
        con.execute("DELETE FROM annotations WHERE generation = ? AND annotator = ?", [generation, annotator])
        insert_rows(
            con, "INSERT INTO annotations VALUES (?,?,?,?,?,?,?,?,?)",
            [[generation, r.passage_id, annotator, r.status, r.reason, r.attempts, r.truncated,
              json.dumps(r.record) if r.record is not None else None, r.call_key] for r in results])


def store_members(con, generation: int, ensemble: Ensemble) -> None:
    """Record who annotates; drop this generation's annotations by members no longer in the
    ensemble (a renamed or removed member), so the splits and the audit see only this one's."""
    with transaction(con):
        insert_rows(con, "INSERT OR REPLACE INTO members VALUES (?,?,?,?,?)",
                    [[m.name, m.family, m.persona, m.backend.model_name, m.backend.kind] for m in ensemble.members])
        con.execute("DELETE FROM annotations WHERE generation = $g AND annotator NOT IN (SELECT unnest($names))",
                    {"g": generation, "names": [m.name for m in ensemble.annotators]})


def reputation_weights(con, generation: int) -> dict[str, float]:
    """Each member's latest reputation from generations before this one (see converge.py)."""
    return dict(con.execute("""SELECT annotator, arg_max(mean, generation) FROM reputation
                               WHERE generation < ? GROUP BY annotator""", [generation]).fetchall())


def accepted_annotations(per_member: dict[str, list[AnnotationResult]]) -> list[tuple[str, str, dict]]:
    """(passage_id, annotator, record) of every accepted annotation, in a stable order."""
    return sorted((r.passage_id, name, r.record) for name, results in per_member.items()
                  for r in results if r.status == "accepted")


def run_scrutiny(passages: list[Passage], accepted: list[tuple[str, str, dict]], ensemble: Ensemble, engines,
                 prompts: Prompts, cfg: RatchetConfig, progress) -> list[CritiqueResult]:
    """Every accepted annotation to its k critics; one batch per critic so that each engine
    keeps its critic instructions as the evaluated prefix."""
    if ensemble.k == 0:
        return []
    text = {p.passage_id: p.text for p in passages}
    by_name = {m.name: m for m in ensemble.members}
    work: dict[str, list[Task]] = {c.name: [] for c in ensemble.critics}
    for pid, author, record in accepted:
        for critic in ensemble.critics_for(by_name[author], pid):
            work[critic.name].append(Task(pid, text[pid], author, record))
    total = sum(len(t) for t in work.values())
    task = progress.add_task("critique", total=total) if progress and total else None
    results: list[CritiqueResult] = []
    for name, tasks in work.items():
        if tasks:
            critic = by_name[name]
            results += critique(tasks, critic, engines[id(critic.backend)], prompts, cfg,
                                on_progress=(lambda n: progress.advance(task, n)) if task is not None else None)
    return results


def run_convergence(con, generation: int, passages: list[Passage], accepted: list[tuple[str, str, dict]],
                    ensemble: Ensemble, critiques: list[CritiqueResult],
                    cfg: RatchetConfig) -> tuple[list[Scored], list[Selection], list[Agreement]]:
    weights = reputation_weights(con, generation)
    scored = score_annotations([(pid, author) for pid, author, _ in accepted], critiques, weights)
    ids = list(dict.fromkeys(p.passage_id for p in passages))
    selections = select(ids, scored, cfg.ensemble.threshold, ensemble.k > 0, [m.name for m in ensemble.annotators])
    agreements = agreement(critiques) if critiques else []
    chosen = {(s.passage_id, s.annotator) for s in selections if s.annotator}
    replace_generation(con, "critiques", generation, "INSERT INTO critiques VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
             [[generation, c.passage_id, c.author, c.critic, c.status, c.verdict, json.dumps(c.claim_verdicts),
               json.dumps(c.objections), weights.get(c.critic, PRIOR_WEIGHT), c.reason, c.attempts, c.call_key]
              for c in critiques])
    replace_generation(con, "convergence", generation, "INSERT INTO convergence VALUES (?,?,?,?,?,?)",
             [[generation, s.passage_id, s.annotator, s.score, s.critiques, (s.passage_id, s.annotator) in chosen]
              for s in scored])
    replace_generation(con, "selections", generation, "INSERT INTO selections VALUES (?,?,?,?,?)",
             [[generation, s.passage_id, s.annotator, s.score, s.reason] for s in selections])
    replace_generation(con, "agreement", generation, "INSERT INTO agreement VALUES (?,?,?,?,?,?)",
             [[generation, a.scope, a.member, a.alpha, a.units, a.critiques] for a in agreements])
    return scored, selections, agreements


def open_engine(stack: ExitStack, ensemble: Ensemble, cfg: RatchetConfig, model: str, key: str, con, log) -> CachedBackend:
    """A cached engine for a judge or an auditor: a member's loaded model when it is the same
    engine config, otherwise loaded here and closed when `stack` closes."""
    return CachedBackend(ensemble.load(cfg.annotator.model_copy(update={"model": model}), stack, key), con, log)


@dataclass
class ConscienceInput:
    items: list[Item]
    skipped: list[str]  # sources of items with an empty prompt or response
    frameworks: list[Framework]


def prepare_conscience(ws: Workspace, cfg: RatchetConfig, prompts: Prompts) -> ConscienceInput | None:
    """Load the items and frameworks and find every judge's model before any model runs, so
    that a missing column, a broken framework file or a missing checkpoint fails fast."""
    judges = [("consent.judges", j) for j in cfg.consent.judges]
    c = cfg.conscience
    if c.items:
        judges.append(("conscience.judge", c.judge))
    if cfg.annotator.backend in ("llama_cpp", "llama_server", "auto"):  # GGUF engines: the file must exist
        for key, model in judges:
            try:
                resolve_model(model)
            except ModelNotFound as exc:
                raise ModelNotFound(f"{key}: {exc}") from None
    if not c.items:
        return None
    items, skipped = load_items(ws.resolve(c.items), c.prompt_field, c.response_field, exclude=c.exclude)
    if not items:
        raise ConscienceError(f"{ws.resolve(c.items)}: no item left to judge (every row was empty or excluded)")
    return ConscienceInput(items, skipped, [load_framework(key, prompts) for key in c.frameworks])


def run_conscience_stage(con, generation: int, cfg: RatchetConfig, ensemble: Ensemble, given: ConscienceInput | None,
                         stack: ExitStack, progress, log) -> tuple[dict | None, list[Pair], list[CachedBackend]]:
    """Judge the configured prompt/response items with the frozen judge; unethical responses
    get a rewrite, kept as a DPO pair only when the judge finds the rewrite ethical."""
    if given is None:
        for table in ("conscience_items", "judgements", "pairs"):
            replace_generation(con, table, generation, "", [])
        return None, [], []
    c = cfg.conscience
    items, skipped, frameworks = given.items, given.skipped, given.frameworks
    engine = open_engine(stack, ensemble, cfg, c.judge, "conscience.judge", con, log)
    judge_name = model_short_name(c.judge)
    log.info("conscience: %d items, frameworks %s, judge %s", len(items), ", ".join(c.frameworks), judge_name)
    judgements, pairs = run_conscience(items, frameworks, engine, cfg, progress)
    replace_generation(con, "conscience_items", generation, "INSERT OR IGNORE INTO conscience_items VALUES (?,?,?,?,?)",
                       [[generation, i.item_id, i.source, i.prompt, i.response] for i in items])
    replace_generation(con, "judgements", generation, "INSERT INTO judgements VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       [[generation, j.item_id, j.framework, j.subject, judge_name, j.outcome.status, j.label,
                         json.dumps(j.outcome.record["reasons"]) if j.outcome.record else None, j.outcome.reason,
                         j.outcome.attempts, j.outcome.call_key] for j in judgements])
    replace_generation(con, "pairs", generation, "INSERT INTO pairs VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       [[generation, p.item.item_id, p.framework, judge_name, p.item.prompt, p.item.response, p.chosen,
                         json.dumps(p.reasons), json.dumps(p.chosen_reasons) if p.chosen_reasons else None, p.kept,
                         p.reason, p.rewrite_key] for p in pairs])
    metrics = {"judge": judge_name, "judge_model": engine.backend.describe(), "items": len(items),
               "skipped_items": skipped, "frameworks": {fw.key: fw.name for fw in frameworks},
               "framework_hashes": {fw.key: sha256(fw.source) for fw in frameworks},
               "labels": label_distribution(judgements),
               "unethical": len(pairs), "pairs": sum(p.kept for p in pairs),
               "dropped": dict(sorted(Counter(p.reason.split(":")[0] for p in pairs if not p.kept).items()))}
    return metrics, pairs, [engine]


def training_examples(passages: list[Passage], accepted: list[tuple[str, str, dict]], selections: list[Selection],
                      pairs: list[Pair], prompts: Prompts) -> list[Example]:
    """What the consent judges see: each kept reflection with its passage (sft) and each DPO
    pair's chosen response with its request (dpo)."""
    text = {p.passage_id: p.text for p in passages}
    records = {(pid, author): record for pid, author, record in accepted}
    out = [Example("sft", s.passage_id, "PASSAGE", text[s.passage_id], "REFLECTION",
                   prompts.reflection(records[(s.passage_id, s.annotator)])) for s in selections if s.annotator]
    out += [Example("dpo", f"{p.item.item_id}:{p.framework}", "REQUEST", p.item.prompt, "RESPONSE", p.chosen)
            for p in pairs if p.kept]
    return out


def run_consent(con, generation: int, cfg: RatchetConfig, ensemble: Ensemble, prompts: Prompts,
                examples: list[Example], stack: ExitStack, progress, log) -> tuple[dict | None, list[CachedBackend]]:
    """Every training example to every consent judge; vetoes and drift events to DuckDB."""
    judges = cfg.consent.judges
    consents, engines, checkpoints = [], [], {}
    for model in judges if examples else []:
        name = model_short_name(model)
        engine = open_engine(stack, ensemble, cfg, model, "consent.judges", con, log)
        engines.append(engine)
        checkpoints[name] = engine.backend.describe()
        task = progress.add_task(f"consent ({name})", total=len(examples)) if progress else None
        consents += ask(examples, name, engine, prompts, cfg,
                        on_progress=(lambda n, t=task: progress.advance(t, n)) if progress else None)
    events = drift_events(consents)
    replace_generation(con, "consents", generation, "INSERT INTO consents VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                       [[generation, c.split, c.example_id, c.judge, c.outcome.status, c.answer, c.veto,
                         (c.outcome.record or {}).get("trait"), (c.outcome.record or {}).get("trait_tag"),
                         json.dumps(c.outcome.record["reasons"]) if c.outcome.record else None, c.outcome.reason,
                         c.outcome.attempts, c.outcome.call_key] for c in consents])
    replace_generation(con, "drift_events", generation, "INSERT INTO drift_events VALUES (?,?,?,?,?)",
                       [[generation, e.split, e.example_id, json.dumps(e.judges), json.dumps(e.said)] for e in events])
    if not judges:
        return None, engines
    log.info("consent: %d examples, %d judges, %d drift events", len(examples), len(judges), len(events))
    return {**consent_metrics(consents, events), "checkpoints": checkpoints}, engines


def check_generation(ws: Workspace, con, generation: int, cfg: RatchetConfig, overwrite: bool) -> None:
    """A generation builds on a finished parent, and a compiled one is immutable: refuse
    before any model runs rather than after."""
    if generation > 1:
        done = con.execute("SELECT count(*) FROM builds WHERE generation = ? AND status = 'finished'",
                           [generation - 1]).fetchone()[0]
        if not done or not ws.generation_dir(generation - 1).exists():
            raise RatchetError(f"generation {generation} re-annotates generation {generation - 1}'s passages, which is "
                               f"not built: run `ratchet build --generation {generation - 1}` first")
    compiled = compiled_config_hash(ws.generation_dir(generation))
    if compiled and compiled != sha256(cfg.model_dump()) and not overwrite:
        raise RatchetError(f"{ws.generation_dir(generation)} is compiled and immutable, and ratchet.toml changed since "
                           f"it was built: build the next generation (--generation {generation + 1}), or pass "
                           "--overwrite to rebuild and replace this one")


def parent_passages(con, generation: int) -> list[Passage]:
    """Generation N annotates exactly the passages of generation N - 1, in the same order."""
    rows = con.execute("""SELECT g.passage_id, g.source, g.position, p.text, p.n_tokens
                          FROM generation_passages g JOIN passages p USING (passage_id)
                          WHERE g.generation = ? ORDER BY g.ord""", [generation - 1]).fetchall()
    return [Passage(*row) for row in rows]


def annotation_config(cfg: RatchetConfig, generation: int) -> RatchetConfig:
    """With ratchet.reseed, each generation samples its annotations with its own seed."""
    if not cfg.ratchet.reseed or generation == 1:
        return cfg
    return cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"seed": cfg.sampling.seed + 1000 * (generation - 1)})})


def run_ratchet(con, generation: int, cfg: RatchetConfig, ensemble: Ensemble, prompts: Prompts,
                passages: list[Passage], accepted: list[tuple[str, str, dict]], selections: list[Selection],
                stack: ExitStack, progress, log) -> tuple[dict, list[CachedBackend]]:
    """The reference panel scores this generation's candidates (converged, not vetoed) and the
    parent's reflections; a candidate replaces the parent's only if it scores at least as well."""
    panel = ratchet.open_panel(ratchet.load_or_freeze_panel(con, cfg, ensemble, generation), ensemble, stack, con, log)
    vetoed = {e for e, in con.execute("SELECT DISTINCT example_id FROM consents WHERE generation = ? AND split = 'sft' "
                                      "AND veto", [generation]).fetchall()}
    records = {(pid, author): record for pid, author, record in accepted}
    new, why_not = {}, {}
    for s in selections:
        if s.annotator and s.passage_id not in vetoed:
            new[s.passage_id] = Reflection(s.passage_id, s.annotator, generation, records[(s.passage_id, s.annotator)])
        else:
            why_not[s.passage_id] = "the new reflection was vetoed by a consent judge" if s.annotator else s.reason
    parents = ratchet.parent_reflections(con, generation)
    text = {p.passage_id: p.text for p in passages}
    scores, verdicts = ratchet.score([*new.values(), *parents.values()], text, panel, prompts, cfg, progress)
    decisions = ratchet.decide(list(dict.fromkeys(p.passage_id for p in passages)), new, parents, scores, why_not)
    ratchet.store(con, generation, decisions, verdicts, prompts)
    log.info("ratchet: %s", dict(Counter(d.decision for d in decisions)))
    return ({**ratchet.metrics(con, generation), "panel": [p.name for p, _, _ in panel],
             "panel_models": {p.name: p.model_hash for p, _, _ in panel},
             "panel_attempts": sum(v.attempts for v in verdicts)}, [e for _, _, e in panel])


def run_audit(ws: Workspace, con, generation: int, cfg: RatchetConfig, ensemble: Ensemble, prompts: Prompts,
              progress, log) -> tuple[dict, list[CachedBackend]]:
    """Choose the secret sample, let the model auditor check it, update reputation.
    Only aggregates leave this function: they go to the summary, the manifest and the card."""
    secret = load_secret(ws.root)
    items = sample(con, secret, generation, cfg.audit.rate)
    engines, failed = [], 0
    if cfg.audit.auditor and items:
        auditor = f"{model_short_name(cfg.audit.auditor)}-{cfg.audit.persona}"
        with ExitStack() as stack:  # the auditor's model is often a member's: then it is reused, not reloaded
            engine = open_engine(stack, ensemble, cfg, cfg.audit.auditor, "audit.auditor", con, log)
            engines.append(engine)
            task = progress.add_task(f"audit ({auditor})", total=len(items)) if progress else None
            rows, failed = model_audit(con, items, generation, engine, prompts, cfg, auditor,
                                       on_progress=(lambda n: progress.advance(task, n)) if progress else None)
        store_audits(con, generation, rows)
    reputation = update_reputation(con, generation)
    audits, passes = con.execute("SELECT count(*), count(*) FILTER (verdict = 'pass') FROM audits WHERE generation = ?",
                                 [generation]).fetchone()
    return {"rate": cfg.audit.rate, "sampled": len(items), "audits": audits,
            "pass_rate": round(passes / audits, 3) if audits else None, "invalid_verdicts": failed,
            "reputation": {k: round(v, 3) for k, v in sorted(reputation.items())}}, engines


def metrics_of(n_passages: int, results: list[AnnotationResult], engines: list[CachedBackend], report: IngestReport,
               seconds: float) -> dict:
    attempts = sum(r.attempts for r in results)
    reasons = Counter((r.reason or "").split(":")[0] for r in results if r.status == "rejected")
    return {
        "passages": n_passages,
        "annotations": len(results),
        "accepted": sum(r.status == "accepted" for r in results),
        "rejected": sum(r.status == "rejected" for r in results),
        "rejection_reasons": dict(sorted(reasons.items())),
        "attempts": attempts,
        "truncation_rate": round(sum(r.truncated for r in results) / attempts, 4) if attempts else 0.0,
        "model_calls": sum(e.stats.calls for e in engines),
        "cached_calls": sum(e.stats.hits for e in engines),
        "engine_errors": sum(e.stats.errors for e in engines),
        "completion_tokens": sum(e.stats.completion_tokens for e in engines),
        "files": report.files,
        "records": report.records,
        "empty_records": report.empty_records,
        "duplicate_passages": report.duplicates,
        "skipped_files": [f"{f}: {why}" for f, why in report.skipped_files],
        "skipped_records": [f"{s}: {why}" for s, why in report.skipped_records],
        "seconds": round(seconds, 2),
    }


def ensemble_metrics(ensemble: Ensemble, per_member: dict[str, list[AnnotationResult]], critiques: list[CritiqueResult],
                     scored: list[Scored], selections: list[Selection], agreements: list[Agreement],
                     cfg: RatchetConfig) -> dict:
    """What the summary, the manifest and the card say about the ensemble."""
    selected = Counter(s.annotator for s in selections if s.annotator)
    scores: dict[str, list[float]] = {}
    for s in scored:
        if s.score is not None:
            scores.setdefault(s.annotator, []).append(s.score)
    members = {}
    for m in ensemble.members:
        results = per_member.get(m.name, [])
        mine = [c for c in critiques if c.critic == m.name and c.status == "accepted"]
        members[m.name] = {
            "family": m.family, "persona": m.persona, "roles": m.roles,
            "accepted": sum(r.status == "accepted" for r in results), "rejected": sum(r.status == "rejected" for r in results),
            "selected": selected.get(m.name, 0),
            "mean_score": round(sum(scores[m.name]) / len(scores[m.name]), 3) if scores.get(m.name) else None,
            "critiques": len(mine), "survives_given": sum(c.verdict == "survives" for c in mine)}
    reasons = Counter(s.reason.split(":")[0] for s in selections if not s.annotator)
    return {
        "k": ensemble.k, "threshold": cfg.ensemble.threshold, "families": ensemble.families, "members": members,
        "critiques": sum(c.status == "accepted" for c in critiques),
        "invalid_critiques": sum(c.status != "accepted" for c in critiques),
        "verdicts": dict(sorted(Counter(c.verdict for c in critiques if c.verdict).items())),
        "selected": sum(1 for s in selections if s.annotator), "not_selected": dict(sorted(reasons.items())),
        "agreement": {("generation" if a.scope == "generation" else f"{a.scope}:{a.member}"): a.alpha for a in agreements},
        "warnings": ensemble.warnings(),
    }


def run_build(ws: Workspace, generation: int = 1, corpus: str | None = None, progress=None,
              overwrite: bool = False, config: RatchetConfig | None = None) -> dict:
    """Build one generation. `progress` is a rich Progress (or None). Generation 1 ingests the
    corpus; generation N > 1 re-annotates generation N - 1's passages and keeps, per passage,
    the better of the two reflections by the fixed panel (the ratchet). `config` replaces the
    workspace's ratchet.toml for this build (e.g. `ratchet loop` adding the trained model as a
    member); the manifest records the config the build ran with. Returns the summary."""
    cfg = config or ws.config
    log = build_logger(ws, generation)
    with ws.lock():
        con = ws.connect()
        started = time.perf_counter()
        # We hold the lock, so a build still marked running was killed: say so.
        con.execute("UPDATE builds SET status = 'interrupted' WHERE status = 'running'")
        con.execute("INSERT INTO builds VALUES (?, now(), NULL, 'running', NULL)", [generation])
        status, summary = "failed", None
        try:
            check_generation(ws, con, generation, cfg, overwrite)
            if generation > 1 and corpus:
                raise RatchetError(f"--corpus applies to generation 1 only: generation {generation} re-annotates "
                                   f"generation {generation - 1}'s passages")
            prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)
            conscience_input = prepare_conscience(ws, cfg, prompts)
            with Ensemble(cfg) as ensemble:
                for line in ensemble.warnings():
                    log.warning(line)
                first = ensemble.annotators[0].backend  # its tokenizer measures the passages
                if generation == 1:
                    corpus_path = ws.resolve(corpus or cfg.corpus.path)
                    passages, report = ingest(corpus_path, cfg.corpus.text_field, cfg.corpus.chunk_tokens,
                                              first.count_tokens, cfg.corpus.on_bad_file)
                    log.info("ingested %d passages from %s", len(passages), corpus_path)
                else:
                    passages, report = parent_passages(con, generation), IngestReport()
                    log.info("re-annotating the %d passages of generation %d", len(passages), generation - 1)
                store_passages(con, generation, passages)
                store_members(con, generation, ensemble)
                engines = {id(m.backend): CachedBackend(m.backend, con, log) for m in ensemble.members}
                per_member: dict[str, list[AnnotationResult]] = {}
                annotate_cfg = annotation_config(cfg, generation)
                for member in ensemble.annotators:
                    task = progress.add_task(f"annotate ({member.name})", total=len(passages)) if progress else None
                    per_member[member.name] = annotate(
                        passages, engines[id(member.backend)], prompts, annotate_cfg, persona=member.persona,
                        temperature=member.temperature, on_progress=(lambda n, t=task: progress.advance(t, n)) if progress else None)
                    store_annotations(con, generation, member.name, per_member[member.name])
                accepted = accepted_annotations(per_member)
                critiques = run_scrutiny(passages, accepted, ensemble, engines, prompts, cfg, progress)
                scored, selections, agreements = run_convergence(con, generation, passages, accepted, ensemble, critiques, cfg)
                with ExitStack() as stack:  # judges loaded only for this build close with it
                    conscience, pairs, judge_engines = run_conscience_stage(con, generation, cfg, ensemble, conscience_input,
                                                                            stack, progress, log)
                    examples = training_examples(passages, accepted, selections, pairs, prompts)
                    consent, consent_engines = run_consent(con, generation, cfg, ensemble, prompts, examples, stack,
                                                           progress, log)
                    ratchet_metrics, panel_engines = run_ratchet(con, generation, cfg, ensemble, prompts, passages,
                                                                 accepted, selections, stack, progress, log)
                audit, audit_engines = run_audit(ws, con, generation, cfg, ensemble, prompts, progress, log)
                results = [r for rs in per_member.values() for r in rs]
                metrics = metrics_of(len(passages), results, [*engines.values(), *judge_engines, *consent_engines,
                                                              *panel_engines, *audit_engines], report, time.perf_counter() - started)
                metrics["ensemble"] = ensemble_metrics(ensemble, per_member, critiques, scored, selections, agreements, cfg)
                metrics["audit"] = audit
                metrics["conscience"] = conscience
                metrics["consent"] = consent
                metrics["ratchet"] = ratchet_metrics
                out, written = compile_generation(ws, con, generation, prompts, ensemble.describe(), metrics, overwrite,
                                                  config=cfg)
            metrics["seconds"] = round(time.perf_counter() - started, 2)
            status = "finished"
            log.info("finished generation %d in %.1fs", generation, metrics["seconds"])
            summary = {"generation": generation, "parent": generation - 1 if generation > 1 else None,
                       "compiled": "written" if written else "unchanged (already compiled with identical splits)",
                       "workspace": str(ws.root), "output": str(out),
                       "database": str(ws.db_path), "card": str(out / "README.md"), **metrics}
            return summary
        except KeyboardInterrupt:
            status = "interrupted"  # Ctrl-C: every finished call is already in the cache
            log.info("interrupted by the user")
            raise
        finally:
            con.execute("UPDATE builds SET finished_at = now(), status = ?, summary = ? WHERE status = 'running'",
                        [status, json.dumps(summary) if summary else None])
            con.close()
