"""Can each judge tell good from bad? Meta-evaluation by perturbation (builder/validity.py),
on a built generation, and the conscience judge on a labelled file.

For the final reflections of a generation (the ratchet's, the ones the sft split holds) it
makes known-worse variants (another passage's reflection, evidence not in the passage, flipped
support, a negated claim, a reflection cut after its first claim) and has every judge score
originals and variants: each critic member of the workspace's ensemble, the grounding
verifier, and the ratchet panel as a whole (the mean of its members). The annotation auditor
audits originals and variants (AUC of P(pass)); the critique auditor judges right and wrong
critiques of originals and worse variants. Per judge and
perturbation it prints the AUC of score(original) vs score(variant), raw and calibrated, the
pairwise win rate of the original (asked in both orders) and the position consistency. Then
the conscience judge on examples/code_hacking/judge_eval.jsonl: accuracy, Cohen's kappa and
AUC (unethical vs the rest) for the generated labels, the raw log-probabilities and the
calibrated ones. Every call goes through a cache (bench/results/validity.duckdb): a rerun is free.

    make demo                                   # builds demo-workspace's generation 1
    .venv/bin/python bench/validity.py          # --workspace demo-workspace --limit 8

Writes bench/results/validity.json and validity.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from builder import verifier  # noqa: E402
from builder.cache import CachedBackend  # noqa: E402
from builder.ensemble import Ensemble  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.audit import AuditTask, CritiqueAuditTask, SampledCritique, SampledItem  # noqa: E402
from builder.stages.base import run_task  # noqa: E402
from builder.stages.conscience import JudgeTask, load_framework, load_items, readings  # noqa: E402
from builder.stages.ratchet import CompareTask, Pairing, panel_sampling  # noqa: E402
from builder.stages.scrutinize import VERDICT_POINTS, CritiqueTask, Task, critic_sampling  # noqa: E402
from builder.validity import PERTURBATIONS, auc, perturb  # noqa: E402
from builder.workspace import Workspace, create_schema  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def points(probs: dict | None) -> float | None:
    return None if probs is None else sum(probs.get(v, 0.0) * p for v, p in VERDICT_POINTS.items())


def reflections(ws: Workspace, generation: int, limit: int) -> list[tuple[str, str, dict]]:
    """(passage_id, passage, record) of the generation's final reflections, in passage order."""
    con = ws.connect(read_only=True)
    rows = con.execute("""SELECT r.passage_id, p.text, r.record FROM ratchet r JOIN passages p USING (passage_id)
                          WHERE r.generation = ? AND r.record IS NOT NULL ORDER BY r.passage_id""",
                       [generation]).fetchall()
    if len(rows) < 2:  # too few kept: take every accepted annotation, one per passage
        rows = con.execute("""SELECT a.passage_id, p.text, any_value(a.record ORDER BY a.annotator)
                              FROM annotations a JOIN passages p USING (passage_id)
                              WHERE a.generation = ? AND a.status = 'accepted' GROUP BY ALL ORDER BY 1""",
                           [generation]).fetchall()
    con.close()
    return [(pid, text, json.loads(record)) for pid, text, record in rows[:limit]]


def variants(picked: list[tuple[str, str, dict]]):
    out = []
    for i, (pid, text, record) in enumerate(picked):
        other = picked[(i + 1) % len(picked)][2]
        out.append((i, "original", Task(pid, text, f"{i}:original", record)))
        out += [(i, v.kind, Task(pid, text, f"{i}:{v.kind}", v.record)) for v in perturb(pid, text, record, other, i)]
    return out


def absolute(items, critics, verifiers, prompts, cfg, cache) -> dict:
    """{judge: {(i, kind): (raw score, calibrated score)}} for every critic and the verifier."""
    scores = {}
    for critic in critics:
        task = CritiqueTask(prompts, critic_sampling(cfg, critic), 0, critic, judging=cfg.judgements)
        t0 = time.perf_counter()
        rows = run_task(task, [t for _, _, t in items], CachedBackend(critic.backend, cache))
        print(f"  {critic.name}: {len(rows)} critiques in {time.perf_counter() - t0:.0f} s", flush=True)
        scores[critic.name] = {(i, kind): (points(r.probs), points(r.calibrated) if r.calibrated else points(r.probs))
                               for (i, kind, _), r in zip(items, rows) if r.status == "accepted"}
    for v in verifiers:
        scores[v.name] = {(i, kind): (verifier.check(t.passage, t.record).share,) * 2 for i, kind, t in items}
    return scores


def pairwise(items, critics, verifiers, prompts, cfg, cache) -> dict:
    """{judge: {(i, kind): (P(original better), both orders agree)}} for every perturbation."""
    originals = {i: t for i, kind, t in items if kind == "original"}
    worse = [(i, kind, t) for i, kind, t in items if kind != "original"]
    out = {}
    frozen = {"max_tokens": cfg.ensemble.critic_max_tokens, "temperature": cfg.sampling.temperature,
              "top_p": cfg.sampling.top_p, "repeat_penalty": cfg.sampling.repeat_penalty, "seed": cfg.sampling.seed,
              "retries": cfg.annotate.retries}
    for critic in critics:
        task = CompareTask(prompts, panel_sampling(frozen), critic, cfg.judgements)
        pairs = [Pairing(t.passage_id, t.passage, originals[i].record, t.record) for i, _, t in worse]
        pairs += [Pairing(t.passage_id, t.passage, t.record, originals[i].record) for i, _, t in worse]
        outcomes = run_task(task, pairs, CachedBackend(critic.backend, cache))
        res = {}
        for j, (i, kind, _) in enumerate(worse):
            first, second = outcomes[j], outcomes[len(worse) + j]
            if first.graded and second.graded:
                p1, p2 = first.graded.p("A"), second.graded.p("B")
                res[(i, kind)] = ((p1 + p2) / 2, (p1 > 0.5) == (p2 > 0.5))
        out[critic.name] = res
    for v in verifiers:
        res = {}
        for i, kind, t in worse:
            a, b = (verifier.check(t.passage, r).share for r in (originals[i].record, t.record))
            res[(i, kind)] = (1.0 if a > b else 0.0 if a < b else 0.5, True)
        out[v.name] = res
    return out


def table(scores: dict, pairs: dict, panel: list[str]) -> list[dict]:
    rows = []
    judges = [*scores, "panel"]
    for judge in judges:
        for kind in PERTURBATIONS:
            if judge == "panel":  # as the ratchet scores: the mean over the members with a valid answer
                members = [scores[m] for m in panel if m in scores]
                keys = set().union(*(set(m) for m in members)) if members else set()
                mean = {k: tuple(sum(m[k][x] for m in members if k in m) / sum(k in m for m in members) for x in (0, 1))
                        for k in keys}
                pm = [pairs[m] for m in panel if m in pairs]
                pkeys = set().union(*(set(m) for m in pm)) if pm else set()
                pmean = {k: (sum(m[k][0] for m in pm if k in m) / sum(k in m for m in pm),
                             all(m[k][1] for m in pm if k in m)) for k in pkeys}
            else:
                mean, pmean = scores[judge], pairs.get(judge, {})
            orig = {i: s for (i, k), s in mean.items() if k == "original"}
            var = {i: s for (i, k), s in mean.items() if k == kind and i in orig}
            won = [p for (i, k), p in pmean.items() if k == kind]
            rows.append({
                "judge": judge, "perturbation": kind, "n": len(var),
                "auc_raw": auc([orig[i][0] for i in var], [var[i][0] for i in var]),
                "auc_calibrated": auc([orig[i][1] for i in var], [var[i][1] for i in var]),
                "win_rate": round(sum(p > 0.5 for p, _ in won) / len(won), 3) if won else None,
                "position_consistency": round(sum(c for _, c in won) / len(won), 3) if won else None})
    return rows


def critique_audits(items, prompts, cfg, engine, auditor: str) -> list[dict]:
    """The critique auditor (#15.12): is a critique right about the reflection? Each original and
    each clearly worse variant (another passage's reflection, evidence not in the passage) gets
    two critiques: a "survives" one (every claim sound) and a "reject" one (every claim wrong).
    Right: survives on an original, reject on a worse variant; wrong: the other way round. The
    AUC of P(right) for right vs wrong critiques, on each side and pooled: an auditor that only
    looks at the critique's verdict scores 1 on one side, 0 on the other and 0.5 pooled."""
    def critique(verdict, n):
        sound = verdict == "survives"
        return {"claim_verdicts": ["sound" if sound else "wrong"] * n, "verdict": verdict,
                "objections": [] if sound else ["The claims are not in the passage."]}

    cases = []  # (side, right?, SampledCritique)
    for i, kind, t in items:
        if kind not in ("original", "other", "evidence"):
            continue
        side = "original" if kind == "original" else "worse"
        for verdict in ("survives", "reject"):
            right = (verdict == "survives") == (side == "original")
            x = SampledCritique(t.passage_id, "", "", t.passage, t.record, critique(verdict, len(t.record["claims"])))
            cases.append((side, right, x))
    t0 = time.perf_counter()
    outcomes = run_task(CritiqueAuditTask(prompts, cfg, auditor), [x for _, _, x in cases], engine)
    print(f"  critique auditor {auditor}: {len(cases)} audits in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for side in ("original", "worse", "pooled"):
        got = [(right, o) for (s, right, _), o in zip(cases, outcomes) if o.graded and side in (s, "pooled")]
        for reading in ("raw", "calibrated"):
            def p_right(o):
                probs = o.graded.calibrated if reading == "calibrated" and o.graded.calibrated else o.graded.raw
                return (probs or o.graded.probs)["right"]
            rows.append({"judge": f"critique auditor ({auditor})", "side": side, "reading": reading, "n": len(got),
                         "auc": auc([p_right(o) for r, o in got if r], [p_right(o) for r, o in got if not r]),
                         "accuracy": round(sum((o.graded.decided == "right") == r for r, o in got) / len(got), 3)
                         if got else None})
    return rows


def annotation_audits(items, prompts, cfg, engine, auditor: str) -> list[dict]:
    """The annotation auditor (audit.auditor), whose verdicts make each annotator's reputation:
    AUC of P(pass), originals vs each known-worse variant."""
    sampled = [SampledItem(t.passage_id, "", t.passage, t.record) for _, _, t in items]
    t0 = time.perf_counter()
    outcomes = run_task(AuditTask(prompts, cfg, auditor), sampled, engine)
    print(f"  annotation auditor {auditor}: {len(sampled)} audits in {time.perf_counter() - t0:.0f} s", flush=True)
    p_pass = {(i, kind): o.graded.p("pass") for (i, kind, _), o in zip(items, outcomes) if o.graded}
    originals = {i: p for (i, kind), p in p_pass.items() if kind == "original"}
    rows = []
    for kind in PERTURBATIONS:
        worse = {i: p for (i, k), p in p_pass.items() if k == kind and i in originals}
        rows.append({"judge": f"annotation auditor ({auditor})", "perturbation": kind, "n": len(worse),
                     "auc": auc([originals[i] for i in worse], list(worse.values()))})
    return rows


def conscience(cfg, prompts, engine, path: Path, limit: int | None) -> list[dict]:
    items, _ = load_items(path, label_field="label")
    items = items[:limit] if limit else items
    fw = load_framework(cfg.conscience.frameworks[0], prompts)
    outcomes = run_task(JudgeTask(fw, cfg), [(i.prompt, i.response) for i in items], engine)
    return [{"judge": f"conscience ({cfg.conscience.judge}, {fw.key})", "reading": name, "n": m["n"],
             "accuracy": m["accuracy"], "kappa": m["cohen_kappa"], "auc_unethical": m["auc_unethical"]}
            for name, m in readings(items, outcomes).items()]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges = list(dict.fromkeys(r["judge"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    width = 0.8 / len(judges)
    for j, judge in enumerate(judges):
        values = [next((r["auc_calibrated"] for r in rows if r["judge"] == judge and r["perturbation"] == k), None) or 0
                  for k in PERTURBATIONS]
        ax.bar([x + j * width for x in range(len(PERTURBATIONS))], values, width, label=judge)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ax.set_xticks([x + width * (len(judges) - 1) / 2 for x in range(len(PERTURBATIONS))], PERTURBATIONS)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("AUC, original vs variant (calibrated)")
    ax.set_title("Which judge can tell a reflection from a worse one? (0.5 = noise)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", default="demo-workspace")
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--limit", type=int, default=8, help="reflections to perturb (5 variants each)")
    parser.add_argument("--judge-items", default=str(ROOT / "examples" / "code_hacking" / "judge_eval.jsonl"))
    parser.add_argument("--judge-limit", type=int, default=None)
    parser.add_argument("--no-pairwise", action="store_true")
    args = parser.parse_args()

    ws = Workspace(args.workspace)
    cfg, prompts = ws.config, Prompts(ws.resolve(ws.config.annotate.prompts) if ws.config.annotate.prompts else None)
    picked = reflections(ws, args.generation, args.limit)
    if len(picked) < 2:
        sys.exit(f"{ws.root}: generation {args.generation} has fewer than two reflections to compare")
    con = ws.connect(read_only=True)
    frozen = [n for n, in con.execute("SELECT name FROM panel ORDER BY name").fetchall()]
    con.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache = duckdb.connect(str(RESULTS / "validity.duckdb"))
    create_schema(cache)
    items = variants(picked)
    started = time.perf_counter()
    print(f"{len(picked)} reflections of {ws.root.name} generation {args.generation}, {len(items)} to judge", flush=True)
    auditor = cfg.audit.auditor or "bundled:smollm2"
    with Ensemble(cfg) as ensemble, ExitStack() as stack:
        critics, verifiers = ensemble.critics, ensemble.verifiers
        panel = frozen or [m.name for m in critics] + [v.name for v in verifiers]
        scores = absolute(items, critics, verifiers, prompts, cfg, cache)
        pairs = {} if args.no_pairwise else pairwise(items, critics, verifiers, prompts, cfg, cache)
        # The auditor and the conscience judge are usually a member's model: loaded once, as in a build.
        engine = CachedBackend(ensemble.load(cfg.engine_for(auditor), stack, "audit.auditor"), cache)
        audit_rows = critique_audits(items, prompts, cfg, engine, auditor)
        annotation_audit_rows = annotation_audits(items, prompts, cfg, engine, auditor)
        judge = CachedBackend(ensemble.load(cfg.engine_for(cfg.conscience.judge), stack, "conscience.judge"), cache)
        judge_rows = conscience(cfg, prompts, judge, Path(args.judge_items), args.judge_limit)
    rows = table(scores, pairs, panel)
    seconds = round(time.perf_counter() - started, 1)

    fmt = lambda x: "  n/a" if x is None else f"{x:5.2f}"  # noqa: E731
    print(f"\njudge / perturbation            n   AUC raw  AUC cal  win rate  consistency   (panel = {', '.join(panel)})")
    for r in rows:
        print(f"{r['judge'][:22]:22} {r['perturbation']:9} {r['n']:3}   {fmt(r['auc_raw'])}    {fmt(r['auc_calibrated'])}"
              f"    {fmt(r['win_rate'])}     {fmt(r['position_consistency'])}")
    print("\ncritique auditor: right vs wrong critiques (survives on an original, reject on another passage's or "
          "ungrounded reflection)")
    for r in audit_rows:
        print(f"  {r['side']:8} {r['reading']:10} n {r['n']:3}  AUC {fmt(r['auc'])}  accuracy {fmt(r['accuracy'])}")
    print("\nannotation auditor: AUC of P(pass), original vs variant")
    for r in annotation_audit_rows:
        print(f"  {r['perturbation']:9} n {r['n']:3}  AUC {fmt(r['auc'])}")
    print("\nconscience judge on", Path(args.judge_items).name)
    for r in judge_rows:
        print(f"  {r['reading']:10} n {r['n']}  accuracy {r['accuracy']:.3f}  kappa {r['kappa']:+.3f}"
              f"  AUC(unethical) {fmt(r['auc_unethical'])}")
    out = {"workspace": str(ws.root), "generation": args.generation, "reflections": len(picked), "panel": panel,
           "seconds": seconds, "perturbations": rows, "critique_auditor": audit_rows,
           "annotation_auditor": annotation_audit_rows, "conscience": judge_rows}
    (RESULTS / "validity.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(rows, RESULTS / "validity.png")
    print(f"\n{seconds} s; wrote {RESULTS / 'validity.json'} and validity.png")


if __name__ == "__main__":
    main()
