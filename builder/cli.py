"""`ratchet`: a thin typer CLI over the stages."""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .backends import registry
from .backends.base import EngineError
from .compile import GenerationImmutable, compiled_manifest
from .config import CONFIG_NAME, ConfigError, starter_config
from .corpus import CorpusError
from .ensemble import EnsembleError
from .models import ModelNotFound
from .prompts import PromptError
from .resources import EXAMPLES_DIR
from .stages.audit import (AuditError, create_secret, export_claims, export_critique_sample, export_sample, faithful_per_minute,
                           import_verdicts, load_secret, people_on_kept)
from .stages.conscience import ConscienceError
from .stages.ratchet import RatchetError
from .workspace import Workspace, WorkspaceError

app = typer.Typer(
    help="Moral Ratchet: compile alignment training data. Raw text in; epistemic reflections in an "
    "`internal` role, audited and versioned, out as a Hub dataset.\n\n"
    "Start with `ratchet init DIR --example`, then `ratchet build --workspace DIR`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err = Console(stderr=True)

# What a build reports as one line instead of a traceback: each names the file, line or key.
BUILD_ERRORS = (WorkspaceError, ConfigError, CorpusError, ModelNotFound, EnsembleError, PromptError, ConscienceError,
                RatchetError, GenerationImmutable, EngineError)

WorkspaceOpt = Annotated[Path, typer.Option("--workspace", "-w", help="Workspace folder (holds ratchet.toml).")]
ExecutorOpt = Annotated[Optional[Literal["local", "ray"]], typer.Option(
    "--executor",
    help="Where the model calls run: local (this process) or ray (Ray actors on the cluster of \\[executor] "
         "address; extra .\\[ray]). Default: ratchet.toml's \\[executor] kind, else local. See docs/ray.md.")]
EXAMPLE_QUERY = "SELECT * FROM convergence_by_member"


def fail(message: str, code: int = 1) -> None:
    # soft_wrap: never break the line inside a path or a quoted value, which must stay copyable
    # (and greppable in a log) however narrow the terminal or however deep the workspace
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def open_workspace(path: Path) -> Workspace:
    try:
        ws = Workspace(path)
        ws.config  # validate now: a typo is reported before any work starts
        return ws
    except (WorkspaceError, ConfigError) as exc:
        fail(str(exc))


# The code-hacking scenario's config: the starter config with the conscience step and the
# consent gate switched on (one copy of the commented starter, not two).
SCENARIO_KEYS = [('items = ""', 'items = "items/scenario.jsonl"'),
                 ('# exclude = {split = "heldout"}', 'exclude = {split = "heldout"}'),
                 ('frameworks = ["three-laws"]', 'frameworks = ["three-laws", "wwjd"]'),
                 ('judges = []', 'judges = ["bundled:smollm2", "bundled:gemma3"]'),
                 ('explored = []', 'explored = ["vetoed", "rejected"]')]


def code_hacking_config() -> str:
    text = starter_config()
    for old, new in SCENARIO_KEYS:
        if old not in text:
            raise RuntimeError(f"examples/ratchet.toml has no line {old!r} to switch on for the scenario")
        text = text.replace(old, new, 1)
    return "# The code-hacking scenario (`ratchet init DIR --scenario code-hacking`): the starter config with the\n" \
           "# conscience step and the consent gate on.\n" + text


@app.command()
def init(
    directory: Annotated[Path, typer.Argument(help="Folder to create (or fill) as a workspace.")],
    example: Annotated[bool, typer.Option("--example", help="Copy the bundled sample corpus into DIR/corpus.")] = False,
    scenario: Annotated[Optional[str], typer.Option(
        help="Set up a bundled scenario instead: 'code-hacking' (a small corpus, 40 coding requests with insecure "
             "responses for the conscience step, consent judges on).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing ratchet.toml.")] = False,
) -> None:
    """Create a workspace: a commented starter ratchet.toml and a corpus/ folder."""
    config = directory / CONFIG_NAME
    if config.exists() and not force:
        fail(f"{config} already exists (use --force to overwrite it)")
    if scenario not in (None, "code-hacking"):
        fail(f"unknown scenario '{scenario}' (known: code-hacking)")
    (directory / "corpus").mkdir(parents=True, exist_ok=True)
    config.write_text(starter_config(), encoding="utf-8")
    secret = create_secret(directory)  # chooses the audit sample; never leaves this folder
    source = EXAMPLES_DIR / "code_hacking" / "corpus" if scenario else EXAMPLES_DIR / "corpus"
    if scenario:
        config.write_text(code_hacking_config(), encoding="utf-8")
        (directory / "items").mkdir(exist_ok=True)
        shutil.copy2(EXAMPLES_DIR / "code_hacking" / "scenario.jsonl", directory / "items" / "scenario.jsonl")
        console.print(f"Scenario code-hacking: {directory / 'items' / 'scenario.jsonl'} (its responses are deliberately "
                      "insecure: never run them)")
    if example or scenario:
        for item in source.iterdir():
            shutil.copy2(item, directory / "corpus" / item.name)
    console.print(f"Workspace ready: [bold]{directory}[/]\n  config: {config}\n  corpus: {directory / 'corpus'}"
                  f"{' (sample corpus copied)' if example or scenario else ' (put .txt, .md, .jsonl or .parquet files here)'}\n"
                  f"\n  audit secret: {secret} (mode 0600; keep it out of version control)\n"
                  f"Next: ratchet build --workspace {directory}")


UNWEIGHTED_BECAUSE = {"human": "no person has audited a critique yet", "prior": "every vote weighs the same"}


def _by_name(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in values.items())


def _fmt_alpha(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _prompt_tokens(s: dict) -> str:
    prompt, cached = s.get("prompt_tokens", 0), s.get("cached_prompt_tokens", 0)
    return f"{prompt} ({cached / prompt:.0%} served from a cached prefix)" if prompt else "0"


def _per_kept(cost: dict | None) -> str:
    """The cost of what a user keeps: this run's seconds and evaluated tokens per sft reflection."""
    if not cost:
        return "n/a (no reflection kept)"
    return f"{cost['seconds']:.2f} s, {cost['tokens_evaluated']} tokens evaluated ({cost['kept']} kept)"


def _faithfulness(f: dict | None) -> str:
    """Claims kept and dropped by the gates (builder/faithfulness.py), and the annotations they vetoed."""
    if not f or not f.get("claims_written"):
        return "no claim checked"
    share = f"{100 * f['verified_share']:.0f}%"
    return (f"{f['claims_kept']} of {f['claims_written']} claims kept ({share} verified; "
            f"{f.get('quotes_rechosen', 0)} with their quote re-chosen, {f.get('claims_unwrapped', 0)} unwrapped), dropped "
            f"{f['claims_dropped'] or 'none'}, {f['notes_dropped']} note(s) or reflection sentence(s) dropped"
            f"{_note_judge(f)}{_refused_reflections(f)}; vetoed {f['vetoed'] or 'none'}")


def _refused_reflections(f: dict) -> str:
    """Reflections the gates refused whole in answers kept for their verified claims
    (annotate.refused_reflection): rewritten by their writers, or rebuilt from the quotes."""
    if not f.get("reflections_refused"):
        return ""
    refused, rewritten = f["reflections_refused"], f.get("reflections_rewritten", 0)
    return (f"; {refused} reflection(s) refused whole in answers kept for their verified claims: {rewritten} "
            f"rewritten by their writer, {refused - rewritten} rebuilt from their claims' quotes")


def _note_judge(f: dict) -> str:
    """The note judge's share of the sentences dropped (annotate.note_judge), where it was asked."""
    if not f.get("notes_judged"):
        return ""
    rebuilt = f.get("reflections_rebuilt", 0)
    rebuilt = f"; {rebuilt} reflection(s) rebuilt from their claims' quotes" if rebuilt else ""
    return (f" (the note judge cut {f['notes_cut_by_judge']} of the {f['notes_judged']} note and reflection sentences it "
            f"was asked of{rebuilt})")


def _best_of(b: dict) -> str:
    """What sampling several candidates per passage did (annotate.best_of)."""
    return (f"{b['samples']} sampled, {b['samples_accepted']} passed every gate; {b['kept_not_first']} kept "
            f"annotation(s) are not the first sample, {b['rescued']} of them where the first was rejected")


def _injection(i: dict | None) -> str:
    """What the injection gate (builder/injection.py) found and did."""
    if not i:
        return "not checked"
    return (f"{i['passages_with_orders']} passage(s) give orders; {i['vetoed']} annotation(s) vetoed for carrying one "
            f"out, {i['kept']} kept on those passages")


def _summary_table(s: dict) -> Table:
    table = Table(title=f"generation {s['generation']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("files / records", f"{s['files']} / {s['records']}"),
        ("empty records skipped", s["empty_records"]),
        ("duplicate passages merged", s["duplicate_passages"]),
        ("skipped files", len(s["skipped_files"])),
        ("skipped records", len(s["skipped_records"])),
        ("passages", s["passages"]),
        ("annotations accepted", f"{s['accepted']} of {s['annotations']}"),
        ("annotations rejected", f"{s['rejected']} {s['rejection_reasons'] or ''}"),
        ("truncated outputs", f"{100 * s['truncation_rate']:.1f}% of {s['attempts']} attempts"),
        ("faithfulness gates", _faithfulness(s.get("faithfulness"))),
        *([("candidates (best of N)", _best_of(s["best_of"]))] if s.get("best_of") else []),
        ("orders in passages", _injection(s.get("injection"))),
        ("model calls (new / cached)", f"{s['model_calls']} / {s['cached_calls']}"),
        ("engine errors", s["engine_errors"]),
        ("completion tokens", s["completion_tokens"]),
        ("prompt tokens", _prompt_tokens(s)),
        ("time", f"{s['seconds']:.1f} s"),
        ("executor", _executor(s.get("executor"))),
        ("per kept reflection", _per_kept(s.get("per_kept_reflection"))
         + ("; every call came from the cache" if s.get("per_kept_reflection") and not s["model_calls"] else "")),
    ]
    e = s.get("ensemble")
    if e:
        alpha = e["agreement"].get("generation")
        rows += [
            ("ensemble", f"{len(e['members'])} member(s), {len(e['families'])} famil{'y' if len(e['families']) == 1 else 'ies'} "
                         f"({', '.join(e['families'])}), k = {e['k']} critic(s) per annotation"),
            ("critiques (valid / invalid)", f"{e['critiques']} / {e['invalid_critiques']} {e['verdicts'] or ''}"),
            ("kept after convergence", f"{e['selected']} of {s['passages']} passages (threshold {e['threshold']}) "
                                       f"{e['not_selected'] or ''}"),
            ("critic agreement (alpha)", "undefined" if alpha is None else f"{alpha:.3f}"),
        ]
        for name, m in e["members"].items():
            score = "n/a" if m["mean_score"] is None else f"{m['mean_score']:.2f}"
            rows.append((f"  {name}", f"{m['family']}/{m['persona']}: accepted {m['accepted']}, kept {m['selected']}, "
                                      f"mean score {score}, critiques given {m['critiques']}, "
                                      f"alpha as author {_fmt_alpha(e['agreement'].get('author:' + name))}, "
                                      f"as critic {_fmt_alpha(e['agreement'].get('critic:' + name))}"))
    votes = s.get("votes")
    if votes and votes["weight"]:
        rows.append((f"vote weights ({votes['weights_from']})", ", ".join(
            f"{n} {w:.2f}" + (" (at chance: not asked)" if n in votes["not_asked"] else "") for n, w in votes["weight"].items())
            + (f"; {votes['abstained']} critique(s) too unsure to vote (a person decides)" if votes.get("abstained") else "")))
    audit = s.get("audit")
    if audit:
        rows += [
            ("audit sample", f"{audit['sampled']} of {s['accepted']} accepted (rate {audit['rate']:.0%}, chosen by a secret)"),
            ("audit pass rate", f"{audit['pass_rate']:.0%} of {audit['audits']} audits" if audit["pass_rate"] is not None
             else "n/a: the sample waits for people (ratchet audit serve)" if audit["sampled"] else "n/a"),
            ("reputation (annotators)", _by_name(audit["reputation"]) or "no audits yet"),
        ]
        needs = audit.get("needs_a_person")
        if needs and needs["items"]:
            rows.append(("needs a person", f"{needs['items']} item(s) a judge abstained on ("
                         + ", ".join(f"{j} {n}" for j, n in needs["by_judge"].items())
                         + f"; {needs['outside_the_sample']} outside the sample, kept out of pass rates): first on "
                           "`ratchet audit serve`"
                         + (f"; the model auditor decided {audit['sampled'] - audit['abstained'] - audit['invalid_verdicts']}"
                            f" of {audit['sampled']}" if audit["abstained"] else "")))
        critiques = audit.get("critiques")
        if critiques:
            right = "n/a" if critiques["right_rate"] is None else f"{critiques['right_rate']:.0%} right"
            record = _by_name(critiques.get("record", {}))
            source = audit.get("vote_weights_from", "audits")
            rows += [("critique audits", f"{critiques['sampled']} sampled, {critiques['audits']} audited, {right}"
                                         + (f"; record {record}" if record else "")),
                     ("vote weight (next generation)", _by_name(audit["vote_weight"])
                      or f"0.50 each (audit.vote_weights = {source}: {UNWEIGHTED_BECAUSE.get(source, 'no record yet')})")]
    c = s.get("conscience")
    if c:
        rows.append(("conscience", f"judge {c['judge']} (frozen), {c['items']} item(s), {c['unethical']} unethical, "
                                   f"{c['pairs']} dpo pair(s) kept {c['dropped'] or ''}"
                                   + (f"; {c['abstained']} judgement(s) too unsure to decide (judges.abstain_below): "
                                      "no pair rests on them" if c.get("abstained") else "")))
        for key, labels in c["labels"].items():
            rows.append((f"  labels ({key})", "responses " + _counts(labels["original"]) +
                         ("; rewrites " + _counts(labels["rewrite"]) if "rewrite" in labels else "")))
        checks = c.get("checks")
        if checks and checks["judged_ethical"]:
            rows.append(("  answers the request?", f"{checks['removed']} of {checks['judged_ethical']} rewrite(s) judged "
                         "ethical removed; failed per rule: " + ", ".join(f"{rule} {n['fail']}" + (
                             f" (skipped {n['skipped']})" if n["skipped"] else "") for rule, n in checks["by_rule"].items())))
    g = s.get("consent")
    if g:
        rows.append(("consent gate", f"{g['examples']} training example(s), vetoed {g['vetoed'] or 'none'}, "
                                     f"{g['drift_events']} drift event(s)"))
        for name, j in g["judges"].items():
            rows.append((f"  veto rate ({name})", f"{j['veto_rate']:.0%} of {j['examples']} ({j['invalid']} without a valid answer"
                                                         + (f", {j['unsure']} too unsure to decide" if j.get("unsure") else "") + ")"))
        rows.append(("  traits reinforced", _counts(g["trait_tags"]) or "none named"))
    r = s.get("ratchet")
    if r and r.get("history"):
        rate = lambda x: "n/a" if x is None else f"{x:.0%}"
        rows.append(("ratchet", f"gen {s['generation']}" + (f" vs parent gen {s['parent']}" if s.get("parent") else
                                                             " (no parent: the first generation)") +
                     f"; panel {', '.join(r['panel'])}"))
        if r.get("panel_not_asked"):
            rows.append(("  panel not asked", f"{', '.join(r['panel_not_asked'])}: frozen weight 0 (not informative)"
                         + (f"; {r['panel_fallback']}" if r.get("panel_fallback") else "")))
        rows.append(("  mean panel score", " → ".join(f"{h['mean_score']:.3f}" for h in r["history"]) + " (by generation)"))
        rows.append(("  replaced / carried forward", f"{r['replaced']} / {r['carried']} of {r['with_parent']} passages with a "
                     f"parent ({rate(r['replacement_rate'])} / {rate(r['carried_rate'])}); ties (parent kept) "
                     f"{r.get('ties', 0)}, unchanged {r['unchanged']}, new {r['new']}"))
        change = r.get("score_change")
        if change:
            rows.append(("  score change", f"{change['mean']:+.3f} per passage (95% CI {change['low']:+.3f} to "
                                           f"{change['high']:+.3f}, {change['passages']} passages)"))
        if r.get("final_by_member"):
            rows.append(("  final reflections by", _counts(r["final_by_member"])))
        if r.get("self_scores_skipped"):
            rows.append(("  self-scores not asked", f"{r['self_scores_skipped']} ({r['self_score_share']:.0%} of the panel's "
                                                    f"scores; a member never scores its own reflection); "
                                                    f"{r.get('unscored', 0)} final reflection(s) left without a score"))
        unsure = r.get("abstained") or {}
        if unsure.get("scores") or unsure.get("pairwise"):
            rows.append(("  too unsure to count", f"{unsure.get('scores', 0)} score(s) and {unsure.get('pairwise', 0)} "
                                                  "head-to-head preference(s) (judges.abstain_below): stored, not counted"))
        if r.get("pairwise"):
            consistency = r.get("position_consistency")
            rows.append(("  pairwise", f"{r['pairwise']} candidate(s) compared with their parent in both orders; "
                                       f"position consistency {'n/a' if consistency is None else f'{consistency:.0%}'}"))
    if s.get("scripted_engine"):
        rows.append(("[yellow]scripted engine[/]", f"{', '.join(s['scripted_engine'])}: answers without a model "
                                                   "(a dry run); nothing here is a model's judgement"))
    rows.append(("compiled", s.get("compiled", "written")))
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def _executor(e: dict | str | None) -> str:
    """Where the calls ran: local, or the Ray cluster with each stage's throughput."""
    if not isinstance(e, dict) or e.get("kind", "local") == "local":
        return "local (this process)"
    cluster = f"ray at {e.get('address')}: {e.get('nodes', '?')} node(s), {e.get('cpus', 0):g} CPU(s), {e.get('gpus', 0):g} GPU(s)"
    if "engine_starts" in e:  # each actor starts its engine once per build (again only if Ray restarts it)
        cluster += f", {e['engine_starts']} engine start(s)"
    stages = "; ".join(f"{name} {x['calls']} calls in {x['seconds']:.1f} s ({x['calls_per_s'] or 0:.2f}/s)"
                       for name, x in (e.get("stages") or {}).items())
    return cluster + (f"; {stages}" if stages else "; no call missed the cache")


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


@app.command()
def build(
    workspace: WorkspaceOpt = Path("."),
    corpus: Annotated[Optional[str], typer.Option(help="Ingest this file or folder instead of corpus.path, for this run.")] = None,
    generation: Annotated[int, typer.Option(min=1, help="Generation to build. 1 ingests the corpus; N > 1 re-annotates "
                                            "generation N-1's passages and keeps the better reflection of each (the ratchet). "
                                            "Rebuilding a finished one reuses every cached call.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace this generation even if it is compiled and its "
                                            "splits would change (compiled generations are immutable otherwise).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Build generation 1 with the scripted engine in place of "
                                          "every model, in a throwaway copy of the workspace: checks the config, the "
                                          "corpus, the prompts and every stage in seconds; writes nothing here.")] = False,
    executor: ExecutorOpt = None,
) -> None:
    """Ingest the corpus, let every annotating ensemble member annotate every passage, have k
    critics of another family or persona critique each annotation, keep per passage the one
    that converges (or none, with the reason), audit a secret sample, compile
    generations/gen-NNNN/.

    Every model call is cached in the workspace's DuckDB file: a stopped build resumes where it
    stopped, and rebuilding a finished generation makes no model call at all."""
    from .build import dry_run as dry_run_build
    from .build import run_build

    ws = open_workspace(workspace)
    if dry_run and generation != 1:
        fail("--dry-run builds generation 1 (a throwaway workspace has no parent generation)")
    if dry_run and executor == "ray":
        console.print("note: --dry-run runs here, on the scripted engine; --executor ray applies to real builds",
                      highlight=False)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, console=console, transient=False) as progress:
            if dry_run:
                summary = dry_run_build(ws, corpus=corpus, progress=progress)
            else:
                summary = run_build(ws, generation=generation, corpus=corpus, progress=progress, overwrite=overwrite,
                                    executor_kind=executor)
    except BUILD_ERRORS as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("stopped; every finished model call is saved: run the same command to resume", code=130)
    console.print(_summary_table(summary))
    if summary.get("dry_run"):
        console.print(f"dry run: every stage ran on the scripted engine (no model) in a throwaway workspace; "
                      f"nothing was written to {workspace}. Run without --dry-run to build.", highlight=False)
        return
    if summary["accepted"] == 0:
        console.print("[yellow]warning:[/] no reflection was accepted, so the sft split is empty and was not written; "
                      "see the rejection reasons above (raise sampling.max_tokens if they are 'truncated')")
    for label, path in [("dataset", summary["output"]), ("card", summary["card"]), ("database", summary["database"])]:
        console.print(f"[bold]{label}:[/] {path}")
    console.print(f"[bold]try:[/] ratchet sql --workspace {workspace} \"{EXAMPLE_QUERY}\"", soft_wrap=True)
    for line in summary.get("ensemble", {}).get("warnings", []):
        console.print(f"[yellow]warning:[/] {line}", highlight=False)
    for name, weight in summary.get("audit", {}).get("reputation", {}).items():
        if weight < 0.5:
            console.print(f"[yellow]warning:[/] {name} fails most of its annotation audits (reputation {weight:.2f})")
    audit = summary.get("audit", {})
    for name, weight in audit.get("vote_weight", {}).items() if audit.get("vote_weights_from") != "validity" else ():
        if weight < 0.5:
            console.print(f"[yellow]warning:[/] {name}'s critiques are wrong in most of their audits: "
                          f"its votes now weigh {weight:.2f}")
    for line in summary["skipped_files"] + summary["skipped_records"]:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL for DuckDB, e.g. \"SELECT * FROM annotations LIMIT 5\".")],
    workspace: WorkspaceOpt = Path("."),
    format: Annotated[str, typer.Option("--format", "-f", help="table, csv or json.")] = "table",
) -> None:
    """Query the workspace's state with SQL. Read-only.

    Tables: passages, generation_passages, model_calls, annotations, critiques, convergence,
    selections, agreement, members, audits, audit_items, reputation, critique_audits,
    critic_reputation, critic_validity, conscience_items,
    judgements, pairs, consents, drift_events, panel, ratchet, panel_verdicts, panel_comparisons,
    builds, evaluations. Views: convergence_by_member, critic_verdicts_by_member,
    critic_scores_by_member, agreement_by_member, audits_current, audits_stale (verdicts on text a
    rebuild changed), audit_claims (each claim of each current verdict: wrong or not, and a person's
    codes and reason), critique_audits_current, critique_audits_stale, audit_pass_rate_by_*, audit_model_vs_human,
    critique_audit_rate_by_critic,
    audit_coverage, conscience_labels, veto_rate_by_judge, vetoes, trait_tags, drift_by_generation,
    ratchet_by_generation. The query cannot read or write other files (COPY, read_csv, ATTACH
    and extensions are refused)."""
    import duckdb

    ws = open_workspace(workspace)
    con = None
    try:
        con = ws.connect(read_only=True, sandboxed=True)
        cursor = con.execute(query)
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchall()
    except WorkspaceError as exc:
        fail(str(exc))
    except duckdb.Error as exc:
        fail(f"SQL: {exc}")
    finally:
        if con is not None:
            con.close()
    if format == "json":
        console.print_json(json.dumps([dict(zip(columns, r)) for r in rows], default=str))
    elif format == "csv":
        import csv
        import sys

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        table = Table(*columns)
        for r in rows:
            table.add_row(*("NULL" if v is None else str(v) for v in r))
        console.print(table)
        console.print(f"{len(rows)} row(s)")


def _generation_number(value: str) -> int:
    try:
        return int(value.removeprefix("gen-"))
    except ValueError:
        fail(f"'{value}' is not a generation: give a number or a name like gen-0002")


@app.command()
def diff(
    old: Annotated[str, typer.Argument(help="The earlier generation: 1 or gen-0001.")],
    new: Annotated[str, typer.Argument(help="The later generation: 2 or gen-0002.")],
    workspace: WorkspaceOpt = Path("."),
    changed_only: Annotated[bool, typer.Option("--changed-only", help="Leave out passages whose reflection was kept.")] = False,
) -> None:
    """What changed per passage between two generations, and why: `replaced` (the panel scored
    the new reflection at least as well as the old one and preferred it head to head by more than
    0.5 + ratchet.margin; with ratchet.pairwise = false, scored it strictly higher), `kept` (the old one was carried
    forward: the new one scored lower, did not converge or was vetoed), `newly converged`,
    `none`. Scores are the fixed reference panel's (0..1).

    Example: ratchet diff gen-0001 gen-0002 --workspace ws"""
    from .stages import ratchet

    a, b = _generation_number(old), _generation_number(new)
    ws = open_workspace(workspace)
    try:
        con = ws.connect(read_only=True)
    except WorkspaceError as exc:
        fail(str(exc))
    built = {g for g, in con.execute("SELECT DISTINCT generation FROM ratchet").fetchall()}
    for g in (a, b):
        if g not in built:
            fail(f"generation {g} is not built in {ws.root} (built: {', '.join(map(str, sorted(built))) or 'none'})")
    rows = ratchet.diff(con, a, b)
    table = Table("passage", "change", f"gen {a}", f"gen {b}", "why", title=f"gen-{a:04d} → gen-{b:04d}",
                  title_justify="left")
    fmt = lambda who, g, score: "—" if who is None else f"{who} (gen {g}) {score if score is not None else 'n/a'}"
    for r in rows:
        if changed_only and r["change"] in ("kept", "none"):
            continue
        table.add_row(f"{r['passage_id'][:12]} {(r['passage'] or '').replace(chr(10), ' ')[:40]}", r["change"],
                      fmt(r["annotator_a"], r["gen_a"], r["score_a"]), fmt(r["annotator_b"], r["gen_b"], r["score_b"]),
                      r["reason"] or "")
    console.print(table)
    counts = Counter(r["change"] for r in rows)
    console.print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" ({len(rows)} passages)")


@app.command()
def drift(
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[Optional[int], typer.Option(help="List the events of this generation only.")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Events to list (0: only the trend).")] = 20,
) -> None:
    """Value drift between consent judges: the trend across generations (examples judged, veto
    rate, drift events), the veto rate of each frozen checkpoint, then the drift events
    themselves: which example, which checkpoints, what each said."""
    ws = open_workspace(workspace)
    try:
        con = ws.connect(read_only=True)
    except WorkspaceError as exc:
        fail(str(exc))
    trend = con.execute("SELECT generation, judges, examples, vetoed, veto_rate, drift_events, drift_rate "
                        "FROM drift_by_generation").fetchall()
    if not trend:
        console.print("No consent judgements yet: set [consent] judges in ratchet.toml and build.")
        return
    table = Table("generation", "judges", "examples", "vetoed", "veto rate", "drift events", "drift rate",
                  title="trend", title_justify="left")
    for g, judges, examples, vetoed, veto_rate, events, drift_rate in trend:
        table.add_row(str(g), str(judges), str(examples), str(vetoed), f"{veto_rate:.0%}", str(events), f"{drift_rate:.0%}")
    console.print(table)
    table = Table("generation", "judge", "split", "examples", "vetoes", "no answer", "veto rate", "mean P(no)",
                  title="veto rate per checkpoint", title_justify="left")
    for g, judge, split, examples, vetoes, invalid, rate, p_no in con.execute(
            "SELECT generation, judge, split, examples, vetoes, invalid, veto_rate, mean_p_no FROM veto_rate_by_judge"
    ).fetchall():
        table.add_row(str(g), judge, split, str(examples), str(vetoes), str(invalid), f"{rate:.0%}",
                      "n/a" if p_no is None else f"{p_no:.2f}")
    console.print(table)
    events = con.execute("""
        SELECT d.generation, d.split, d.example_id, d.said,
               coalesce(any_value(left(p.text, 80)), any_value(left(i.prompt, 80))) AS what
        FROM drift_events d
        LEFT JOIN passages p ON d.split = 'sft' AND p.passage_id = d.example_id
        LEFT JOIN conscience_items i ON d.split = 'dpo' AND i.generation = d.generation
             AND d.example_id LIKE i.item_id || ':%'
        WHERE $g IS NULL OR d.generation = $g
        GROUP BY ALL ORDER BY d.generation DESC, d.split, d.example_id LIMIT $n""",
                         {"g": generation, "n": limit}).fetchall()
    traits_table(ws, con, generation)
    if limit:
        table = Table("gen", "split", "example", "what", "what each checkpoint said", title="drift events",
                      title_justify="left")
        for g, split, example_id, said, what in events:
            said = json.loads(said)
            table.add_row(str(g), split, example_id, (what or "").replace("\n", " "),
                          "\n".join(f"{j}: {s['consent']} ({s['trait_tag']}): {'; '.join(s['reasons'])}" for j, s in said.items()))
        console.print(table)


def traits_table(ws, con, generation: int | None) -> None:
    """The consent judges' trait predictions per generation, each next to its verification by
    `ratchet experiment personas` when that ran on the generation's trained model."""
    from .experiments.personas import experiment_dir, predicted_traits

    verified_path = experiment_dir(ws) / "results.json"
    verified = json.loads(verified_path.read_text(encoding="utf-8")) if verified_path.is_file() else None
    generations = [g for g, in con.execute("SELECT DISTINCT generation FROM consents ORDER BY generation").fetchall()
                   if generation is None or g == generation]
    table = Table("generation", "predicted trait", "examples", "verified after training (effect [95% CI])",
                  title="predicted traits", title_justify="left")
    for g in generations:
        for t in predicted_traits(con, g)[:8]:
            check = (verified or {}).get("traits", {}).get(t["tag"]) if (verified or {}).get("generation") == g else None
            said = (f"{check['verdict']}: {_ci(check['effect'], True)}" if check else
                    "not checked: under experiments.personas.min_examples, or past its traits cap" if verified
                    and verified.get("generation") == g else "not checked: run `ratchet experiment personas`")
            table.add_row(str(g), t["tag"], str(t["examples"]), said)
    console.print(table)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@app.command()
def publish(
    workspace: WorkspaceOpt = Path("."),
    out: Annotated[Optional[Path], typer.Option(help="Write (or update) a git repository in Hub layout in this folder.")] = None,
    repo_id: Annotated[Optional[str], typer.Option("--repo-id", help="Push to this Hub dataset repository (ORG/NAME).")] = None,
    generation: Annotated[Optional[int], typer.Option(min=1, help="Publish only this generation (default: every compiled one not published yet).")] = None,
    private: Annotated[bool, typer.Option("--private", help="Create the Hub repository private (ignored when it exists).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be written or uploaded; change nothing.")] = False,
) -> None:
    """Publish compiled generations as a Hub dataset: one commit and one tag (gen-0001, named
    like the generation folder) per generation, the tree holding exactly that generation's
    card, manifest and data/ files. Generations already tagged are skipped, so running it
    again only publishes what is new.

    \b
    Examples:
      ratchet publish -w my-ws --out my-dataset          # a git repository on disk
      python -c 'import datasets; print(datasets.load_dataset("my-dataset", "sft"))'
      git -C my-dataset log --oneline --decorate         # one commit and tag per generation
      ratchet publish -w my-ws --repo-id me/my-dataset --dry-run   # what would be uploaded
      HF_TOKEN=hf_... ratchet publish -w my-ws --repo-id me/my-dataset --private

    The Hub token comes from HF_TOKEN or `hf auth login`; it is never printed or written.
    Transient Hub failures (connection errors, timeouts, HTTP 429/5xx) are retried with backoff."""
    from .publish import PublishError, load_generations, publish_hub, publish_local

    if (out is None) == (repo_id is None):
        fail("give exactly one target: --out DIR (a git repository on disk) or --repo-id ORG/NAME (the Hub)")
    log = lambda line: console.print(f"  {line}", highlight=False, markup=False)  # noqa: E731
    try:
        gens = load_generations(workspace, generation)
        if out is not None:
            result = publish_local(gens, out, dry_run=dry_run, log=log)
        else:
            result = publish_hub(gens, repo_id, private=private or None, dry_run=dry_run, log=log)
    except PublishError as exc:
        fail(str(exc))
    for s in result.published:
        if not s.generation.license:
            console.print(f"[yellow]warning:[/] {s.generation.tag} states no licence (publish.license was empty when it "
                          "was built; its card says `unknown`): set one in ratchet.toml for the next generation",
                          highlight=False)
    verb = "would publish" if dry_run else "published"
    table = Table("generation", "tag", "action", "files", "deleted", "commit", title=result.target, title_justify="left")
    for s in result.steps:
        table.add_row(str(s.generation.number), s.generation.tag, f"{verb}" if s.action == "publish" else f"skipped: {s.reason}",
                      f"{len(s.adds)} ({_size(sum(s.adds.values()))})" if s.action == "publish" else "",
                      str(len(s.deletes)) if s.action == "publish" else "", s.commit[:12])
    console.print(table)
    if dry_run:
        for s in result.published:
            console.print(f"[bold]{s.generation.tag}[/] commit \"{s.generation.title}\", then tag {s.generation.tag}",
                          highlight=False)
            for rel, size in s.adds.items():
                console.print(f"  + {rel} ({_size(size)})", highlight=False, markup=False)
            for rel in s.deletes:
                console.print(f"  - {rel}", highlight=False, markup=False)
        if repo_id and result.published:
            console.print("dry run: no network call was made, so generations already on the Hub are listed too; "
                          "a real push skips those whose tag exists (and deletes the previous generation's files)")
        console.print("dry run: nothing was written or uploaded")
    console.print(f"{len(result.published)} generation(s) {verb}, {len(result.skipped)} skipped: {result.target}",
                  highlight=False)
    if out is not None and result.published and not dry_run:
        console.print(f"[bold]try:[/] python -c 'import datasets; print(datasets.load_dataset(\"{out}\", \"sft\"))'",
                      soft_wrap=True, highlight=False)


def _train_table(s: dict) -> Table:
    table = Table(title=f"model {s['model']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    start = s["start_model"]
    table.add_row("dataset", f"generation {s['dataset_generation']} ({s['dataset']})")
    table.add_row("trained from", f"{start['model']} ({start['format']}, sha256 {start['sha256'][:12]})")
    for name in ("sft", "dpo"):
        st = s[name]
        table.add_row(name.upper(), f"skipped: {st['skipped']}" if "skipped" in st else
                      f"{st['steps']} step(s) on {st['examples']} example(s), loss {' → '.join(map(str, st['losses']))}, "
                      f"{st['seconds_per_step']} s/step")
    table.add_row("output", s["output"] + (" (unchanged: already trained from these splits with these settings)"
                                           if s.get("unchanged") else ""))
    return table


def _rate(value) -> str:
    return "n/a" if value is None else f"{value:.0%}"


@app.command()
def train(
    generation: Annotated[int, typer.Option(min=1, help="Dataset generation to train on (its sft split, then its dpo "
                                            "split); writes models/gen-NNNN/.")],
    workspace: WorkspaceOpt = Path("."),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace models/gen-NNNN/ when it was trained from "
                                            "other splits or settings.")] = False,
    evaluate: Annotated[bool, typer.Option("--evaluate", help="Then evaluate the model on the held-out prompts with "
                                           "the frozen judge.")] = False,
) -> None:
    """Train the model of generation N with TRL: SFT on the sft split (loss on the `internal`
    reflections only, through the project's chat template), then DPO on the dpo split when there
    is one. Generation 1 starts from train.base_model (the bundled SmolLM2, dequantized once into
    models/base/), generation N from models/gen-(N-1). The \\[train] section sets steps, batch size,
    learning rates, bf16 and LoRA; the defaults fit a CPU.

    Example: ratchet train --generation 1 --workspace ws"""
    from .evaluate import EvaluationError, evaluate_model
    from .train import TrainError, model_card, train_generation

    ws = open_workspace(workspace)
    try:
        summary = train_generation(ws, generation, overwrite=overwrite, say=lambda line: console.print(line, highlight=False))
        console.print(_train_table(summary))
        if evaluate:
            e = evaluate_model(ws, Path(summary["output"]), summary["model"])
            (Path(summary["output"]) / "README.md").write_text(model_card(summary, e), encoding="utf-8")
            console.print(f"held-out unethical rate (judge {e['judge']}, {e['n']} prompts): {_rate(e['unethical_rate'])} "
                          + ", ".join(f"{fw} {r['counts']}" for fw, r in e["frameworks"].items()), highlight=False)
    except (WorkspaceError, ConfigError, ModelNotFound, TrainError, EvaluationError, ConscienceError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("stopped; nothing was written to models/ (a finished model is renamed into place only when complete)",
             code=130)


@app.command()
def loop(
    generations: Annotated[int, typer.Option(min=1, help="Dataset generations to build; every one but the last "
                                             "trains the model that annotates the next.")] = 2,
    workspace: WorkspaceOpt = Path("."),
    engine: Annotated[str, typer.Option(help="Engine of the trained models as annotators: "
                                        f"{' or '.join(registry.checkpoint_engines())} (see `ratchet engines`).")
                      ] = registry.DEFAULT_CHECKPOINT_ENGINE,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild generations and retrain models whose "
                                            "config changed.")] = False,
    executor: ExecutorOpt = None,
) -> None:
    """The ratchet loop: build generation 1, train models/gen-0001 on it, build generation 2
    on the same passages with that model as one more annotator, ... for K generations.
    The frozen generation-0 model stays the conscience and consent judge and the reference
    panel throughout. Before each build, that generation's annotator model (the base model, then
    each trained one) answers held-out prompts of the code-hacking scenario and the frozen
    judge labels the answers: the unethical rate per generation goes, with the ratchet's
    figures, into models/evaluation.json and models/evaluation.png. Finished steps are reused.

    Example: ratchet loop --generations 2 --workspace ws"""
    from .evaluate import EvaluationError
    from .train import TrainError, run_loop

    if engine not in registry.checkpoint_engines():
        fail(f"--engine: '{engine}' does not run a checkpoint folder (engines that do: "
             f"{', '.join(registry.checkpoint_engines())})")
    ws = open_workspace(workspace)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    try:
        with Progress(*columns, console=console, transient=True) as progress:
            result = run_loop(ws, generations, engine=engine, progress=progress, overwrite=overwrite, executor=executor,
                              say=lambda line: progress.console.print(line, highlight=False))
    except (*BUILD_ERRORS, TrainError, EvaluationError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("stopped; finished builds, models and model calls are kept: run the same command to resume", code=130)
    table = Table("generation", "annotator model", "held-out unethical rate", "mean panel score", "replaced / carried",
                  "final reflections by", "trained", title="ratchet loop", title_justify="left")
    for g in result["generations"]:
        e, r = g["evaluation"], g["build"].get("ratchet") or {}
        judged = "; ".join(f"{fw} {_rate(x['rate'])} ({x['counts']['unethical']} of {x['labelled']})"
                           for fw, x in e["frameworks"].items())
        table.add_row(str(g["generation"]), g["annotator"], judged,
                      "n/a" if r.get("mean_score") is None else f"{r['mean_score']:.3f}",
                      f"{r.get('replaced', 0)} / {r.get('carried', 0)}", _counts(r.get("final_by_member") or {}),
                      (g["trained"]["model"] + (" (unchanged)" if g["trained"].get("unchanged") else ""))
                      if g["trained"] else "—")
    console.print(table)
    first = result["generations"][0]["evaluation"]
    console.print(f"held-out prompts: {first['n']} from {first['items']}; judge {first['judge']} (frozen)", highlight=False)
    for label, path in [("figures", result["evaluation"]), ("plot", result["plot"])]:
        console.print(f"[bold]{label}:[/] {path}")


experiment_app = typer.Typer(help="The papers' experiments: each trains and scores its arms, resumes what it "
                                    "finished, prints a table with intervals and writes results.json and a plot under "
                                    "WS/experiments/NAME/.", no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


def _ci(x: dict, signed: bool = False) -> str:
    if x["mean"] is None:
        return "n/a (no valid label)"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(x['mean'])} [{fmt.format(x['low'])}, {fmt.format(x['high'])}]"


def _run_experiment(workspace: Path, name: str, run, kept: str, **keys) -> dict:
    """Open the workspace, apply experiments.NAME's keys given on the command line, and run the
    experiment (run(ws, cfg, say)); a refusal or Ctrl-C is a clear exit that says what is kept."""
    from .experiments.arms import ExperimentError
    from .train import TrainError

    ws = open_workspace(workspace)
    try:
        return run(ws, _experiment_config(ws.config, name, **keys), lambda line: console.print(line, highlight=False))
    except (WorkspaceError, ConfigError, ModelNotFound, TrainError, ExperimentError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"stopped; {kept} are kept: run the same command to resume", code=130)


def _outputs(r: dict) -> None:
    folder = Path(r["output"])
    console.print(f"[bold]results:[/] {folder}/results.json\n[bold]plot:[/] {folder}/{folder.name}.png")


def _trained(r: dict, arm: str) -> tuple[list[dict], str]:
    """An arm's training runs (one per seed, named ARM-sSEED) and "N step(s) x M seed(s)" ("no": untrained)."""
    runs = [t for name, t in r["training"].items() if name.startswith(f"{arm}-s")]
    return runs, "no" if not runs else f"{runs[0]['steps']} step(s) x {len(runs)} seed(s)"


@experiment_app.command("capability")
def experiment_capability(
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[int, typer.Option(min=1, help="The compiled generation whose sft split trains the arms.")] = 1,
    limit: Annotated[Optional[int], typer.Option(min=0, help="Score the first N items (0 = all); default "
                                                 "experiments.capability.limit.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps per trained arm; default "
                                                 "experiments.capability.steps.")] = None,
) -> None:
    """Does training on the reflections help reasoning, beyond training on the same passages?
    Three arms from train.base_model, scored on multiple-choice reasoning items by
    log-likelihood over the options: base (untrained), annotated (SFT on the generation's sft
    split, loss on the `internal` reflections, as `ratchet train`) and control (the same steps
    on the same passages without reflections). Paired bootstrap 95% intervals; annotated -
    control is the figure that matters. Items: experiments.capability.items (default: the
    project's 320 items, examples/reasoning/reasoning-mc.jsonl). Trained arms and scores are
    reused when nothing they depend on changed.

    Example: ratchet experiment capability -w ws --steps 20"""
    from .experiments.capability import run_capability

    r = _run_experiment(workspace, "capability", lambda ws, cfg, say: run_capability(ws, generation, cfg, say),
                        "finished arms and scores", limit=limit, steps=steps)
    table = Table("arm", "trained", "accuracy [95% CI]", "accuracy, per character [95% CI]", "per seed",
                  *sorted(next(iter(r["arms"].values()))["by_category"]),
                  title=f"capability: {r['items']} items (chance {r['chance']:.2f}), generation {generation}",
                  title_justify="left")
    for arm, x in r["arms"].items():
        runs, done = _trained(r, arm)
        if runs:
            done += ", loss " + ", ".join(str(t["train_loss"]) for t in runs)
        table.add_row(arm, done, _ci(x["accuracy"]), _ci(x["accuracy_norm"]), ", ".join(f"{a:.3f}" for a in x["per_seed"]),
                      *[f"{v['accuracy']:.3f}" for _, v in sorted(x["by_category"].items())])
    for name, x in r["contrasts"].items():
        table.add_row(f"[bold]{name}[/]", "", _ci(x["accuracy"], True), _ci(x["accuracy_norm"], True), "")
    console.print(table)
    for name in ("annotated - control", "annotated - base"):
        console.print(_verdict(name, r["contrasts"][name]["accuracy"]), highlight=False)
    if all(x["accuracy"]["mean"] <= r["chance"] for x in r["arms"].values()):
        console.print(f"every arm scores at or below chance ({r['chance']:.2f}): the model cannot do these items, and "
                      "the differences are differences in how it fails", highlight=False)
    console.print(f"{r['documents']} training document(s); {r['seeds']} training seed(s) per trained arm (the intervals "
                  f"cover the items and the seeds); reused: {', '.join(r['reused']) or 'nothing'}", highlight=False)
    _outputs(r)


def _experiment_config(cfg, name: str, **keys):
    """cfg with experiments.NAME's keys given on the command line (None: the config's)."""
    keys = {k: v for k, v in keys.items() if v is not None}
    if not keys:
        return cfg
    section = getattr(cfg.experiments, name).model_copy(update=keys)
    return cfg.model_copy(update={"experiments": cfg.experiments.model_copy(update={name: section})})


def _verdict(name: str, d: dict) -> str:
    if d["mean"] is None:
        return f"{name}: n/a (no valid label)"
    said = "includes 0: no effect shown" if d["low"] <= 0 <= d["high"] else "excludes 0"
    return f"{name} {d['mean']:+.3f}, 95% CI [{d['low']:+.3f}, {d['high']:+.3f}]: {said}"


@experiment_app.command("inoculation")
def experiment_inoculation(
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[int, typer.Option(min=1, help="The compiled generation whose sft split and explored "
                                            "trajectories train the arms.")] = 1,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Optimizer steps per trained arm; default "
                                                 "experiments.inoculation.steps.")] = None,
) -> None:
    """Does labelling explored trajectories as `Naive_Explorer`'s keep a model that learns to
    predict them from producing them? Three arms from train.base_model, the same steps and
    seeds: without (the sft split), labelled (plus the explored trajectories, vetoed and/or
    rejected, as Naive_Explorer turns) and assistant (plus the same text as assistant turns).
    Each is scored on held-out prompts (conscience.items held out by conscience.exclude, else
    the code-hacking scenario's): the per-token log-likelihood margin of the explored response
    over the reference one, with the turn opened as the assistant (the behaviour) and as
    Naive_Explorer (the prediction), and the share of prompts where the assistant prefers the
    explored response. labelled - assistant, as the assistant, is the figure that matters.

    Example: ratchet experiment inoculation -w ws --steps 20"""
    from .experiments.inoculation import run_inoculation

    r = _run_experiment(workspace, "inoculation", lambda ws, cfg, say: run_inoculation(ws, generation, cfg, say),
                        "finished arms and scores", steps=steps)
    table = Table("arm", "trained", "margin as assistant [95% CI]", "explored rate as assistant",
                  "margin as Naive_Explorer [95% CI]", "per seed (assistant)",
                  title=f"inoculation: {r['probes']} held-out prompts, generation {generation}, "
                        f"{r['explored']['examples']} explored example(s)", title_justify="left")
    for arm, x in r["arms"].items():
        _, done = _trained(r, arm)
        table.add_row(arm, done, _ci(x["as_assistant"]["margin"], True), _ci(x["as_assistant"]["explored_rate"]),
                      _ci(x["as_explorer"]["margin"], True), ", ".join(f"{a:+.3f}" for a in x["as_assistant"]["per_seed"]))
    for name, x in r["contrasts"].items():
        table.add_row(f"[bold]{name}[/]", "", _ci(x["as_assistant"]["margin"], True),
                      _ci(x["as_assistant"]["explored_rate"], True), _ci(x["as_explorer"]["margin"], True), "")
    console.print(table)
    for name in ("labelled - assistant", "labelled - without"):
        console.print(_verdict(f"{name} (margin as the assistant)", r["contrasts"][name]["as_assistant"]["margin"]),
                      highlight=False)
    console.print(f"margin: per-token log-likelihood of the explored response minus the reference response (> 0: "
                  f"the explored one is preferred); held-out prompts: {r['probes_source']}; reused: "
                  f"{', '.join(r['reused']) or 'nothing'}", highlight=False)
    _outputs(r)


@experiment_app.command("personas")
def experiment_personas(
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[int, typer.Option(min=1, help="The generation whose trained model (models/gen-NNNN, from "
                                            "`ratchet train`) and consent predictions are checked.")] = 1,
    limit: Annotated[Optional[int], typer.Option(min=0, help="Use the first N probes (0 = all); default "
                                                 "experiments.personas.limit.")] = None,
) -> None:
    """Were the consent judges right about which persona training would reinforce? For each
    predicted trait with enough trained examples (experiments.personas.min_examples), the start
    model prompted "You are {trait}." and the plain start model answer fixed probe requests;
    the effect is how much more training raised the likelihood of the persona's answers than of
    the plain answers (per token, under the plain prompt), with a bootstrap 95% interval over the
    probes: confirmed when above 0. Control personas nobody predicted run the same way.
    `ratchet drift` then shows each prediction next to its verification.

    Example: ratchet train -w ws && ratchet experiment personas -w ws"""
    from .experiments.personas import run_personas

    r = _run_experiment(workspace, "personas", lambda ws, cfg, say: run_personas(ws, generation, cfg, say),
                        "finished answers and scores", limit=limit)
    table = Table("trait", "examples", "persona prompt", "effect [95% CI]", "probes toward it", "verdict",
                  title=f"personas: generation {generation}, {r['probes']} probes, trained model "
                        f"{Path(r['trained_model']).name} vs {r['start_model']}", title_justify="left")
    for name, x in r["traits"].items():
        table.add_row(name if not x["control"] else f"[dim]{name}[/]", str(x["examples"]) if not x["control"] else "-",
                      x["persona"][:60], _ci(x["effect"], True), f"{x['toward_persona']:.0%}", x["verdict"])
    console.print(table)
    if r["unchecked"]:
        console.print(f"not checked (fewer than {r['settings']['min_examples']} examples, or past "
                      f"experiments.personas.traits): {', '.join(r['unchecked'][:12])}"
                      f"{' ...' if len(r['unchecked']) > 12 else ''}", highlight=False)
    console.print("effect: per-token log-likelihood gain from training of the persona's answers minus that of the "
                  "plain answers; > 0 means the trained model moved toward the persona", highlight=False)
    _outputs(r)


@experiment_app.command("frameworks")
def experiment_frameworks(
    workspace: WorkspaceOpt = Path("."),
    steps: Annotated[Optional[int], typer.Option(min=1, help="DPO steps per condition; default "
                                                 "experiments.frameworks.steps.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=0, help="Scenario items per condition (0 = all); default "
                                                 "experiments.frameworks.limit.")] = None,
) -> None:
    """The framework ablation: the same scenario under each conscience framework
    (prompts/frameworks/*.toml), under each variant of the introspective question
    (prompts/frameworks/questions.txt, put into the base framework) and under no conscience.
    Per condition: the frozen judge's accuracy on the labelled file (with Cohen's kappa and the
    AUC of P(unethical)), the scenario's responses it labels unethical and the pairs it keeps,
    then the held-out unethical rate after DPO from the base model on those pairs, with its
    difference from no conscience (paired by prompt). Judge calls are cached; trained
    conditions are reused while their pairs hold.

    Example: ratchet experiment frameworks -w ws --steps 10"""
    from .experiments.frameworks import run_frameworks

    r = _run_experiment(workspace, "frameworks", run_frameworks, "judge calls and trained conditions", steps=steps, limit=limit)
    table = Table("condition", "judge accuracy [95% CI]", "kappa", "AUC", "unethical / items", "pairs kept",
                  "held-out unethical [95% CI]", "vs none [95% CI]",
                  title=f"frameworks: {r['items']} scenario items, {r['heldout_prompts']} held-out prompts, judge "
                        f"{r['judge']['model']}", title_justify="left")
    for name, x in r["conditions"].items():
        a = x["agreement"]
        table.add_row(name, _ci(a["accuracy"]) if a else "-", f"{a['cohen_kappa']:+.3f}" if a else "-",
                      "n/a" if not a or a["auc_unethical"] is None else f"{a['auc_unethical']:.3f}",
                      f"{x['unethical']} / {r['items']}" if a else "-", str(x["kept"]),
                      _ci(x["heldout_unethical"]) + ("" if x["trained"] or name == "none" else " (no pairs: base)"),
                      _ci(x["vs_none"], True) if x["vs_none"] else "-")
    console.print(table)
    for name, x in r["conditions"].items():
        if x["question"] and "?q" in name:
            console.print(f"{name}: {x['question']}", highlight=False)
    console.print(f"judge: {r['judge']['calls']} model call(s), {r['judge']['cached']} answered from the cache; held-out answers "
                  f"labelled under {', '.join(r['evaluation_frameworks'])}; reused: {', '.join(r['reused']) or 'nothing'}",
                  highlight=False)
    _outputs(r)


@experiment_app.command("emergent-alignment")
def experiment_emergent(
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[int, typer.Option(min=1, help="The compiled generation whose dpo split the offline arm "
                                            "trains on.")] = 1,
    steps: Annotated[Optional[int], typer.Option(min=1, help="SFT steps per arm; default "
                                                 "experiments.emergent.steps.")] = None,
) -> None:
    """The conscience online, during training (the Emergent Alignment set-up). Three arms from
    train.base_model on the scenario's insecure completions (conscience.items, held-out rows
    left out), the same steps and seeds: insecure (SFT alone), online (every
    experiments.emergent.every steps the policy answers training prompts, the frozen judge
    labels them, unethical answers get its rewrite, and the kept pairs feed a DPO term in the
    same optimisation) and offline (SFT, then DPO on the generation's dpo split). Each arm and
    the base model answer the held-out prompts and general prompts outside coding; the frozen
    judge and a judge of another family (experiments.emergent.second_judge) label every answer.
    Unethical rates with bootstrap 95% intervals; online - insecure is the figure that matters.

    Example: ratchet experiment emergent-alignment -w ws --steps 20"""
    from .experiments.emergent import run_emergent

    r = _run_experiment(workspace, "emergent", lambda ws, cfg, say: run_emergent(ws, generation, cfg, say),
                        "trained arms and every model call", steps=steps)
    sets, judges = list(r["prompts"]), r["judges"]
    table = Table("arm", "trained", *[f"{s} ({r['prompts'][s]}), judge {j}" for s in sets for j in judges],
                  title=f"emergent alignment: unethical rate [95% CI], framework {r['framework']}, "
                        f"{r['training_items']} insecure training completions", title_justify="left")
    for arm, x in r["arms"].items():
        runs, done = _trained(r, arm)
        if arm == "online" and runs:
            done += f", {sum(t['pairs'] for t in runs)} online pair(s)"
        table.add_row(arm, done, *[_ci(x[s][j]) for s in sets for j in judges])
    for name, x in r["contrasts"].items():
        table.add_row(f"[bold]{name}[/]", "", *[_ci(x[s][j], True) for s in sets for j in judges])
    console.print(table)
    for s in sets:
        for j in judges:
            if "online - insecure" in r["contrasts"]:
                console.print(_verdict(f"online - insecure, {s} prompts, judge {j}", r["contrasts"]["online - insecure"][s][j]),
                              highlight=False)
    if r["offline"] is None:
        console.print(f"no offline arm: generation {generation} has no dpo split", highlight=False)
    console.print(f"answers without a valid label: {r['invalid']}; reused: {', '.join(r['reused']) or 'nothing'}",
                  highlight=False)
    _outputs(r)


audit_app = typer.Typer(help="Human audits of the secret sample: export it, review it, import the verdicts.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("export")
def audit_export(
    file: Annotated[Path, typer.Argument(help="Where to write the sample: a .csv or .jsonl file.")],
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[int, typer.Option(min=1, help="Generation whose sample to export.")] = 1,
    critiques: Annotated[bool, typer.Option("--critiques", help="Export the sampled critiques instead: was each "
                                            "critic's verdict right about the annotation? (verdict right/wrong)")] = False,
) -> None:
    """Write the items chosen for audit, for a person to review: fill in verdict (pass/fail),
    reasons (separated by ';' in CSV) and wrong_claims (claim numbers, e.g. 1,3). With
    --critiques, the sampled critiques: verdict right/wrong, reasons and wrong_claims (the
    claims whose verdict the critic got wrong, e.g. 2); these weigh each
    critic's votes in later generations.
    The file reveals the secret sample: keep it away from annotators and training data."""
    ws = open_workspace(workspace)
    export = export_critique_sample if critiques else export_sample
    try:
        con = ws.connect(read_only=True)
        n = export(con, load_secret(ws.root), generation, ws.config.audit.rate, file)
    except (WorkspaceError, AuditError) as exc:
        fail(str(exc))
    console.print(f"wrote {n} item(s) to review to {file}\nthen: ratchet audit import {file} --auditor YOUR_NAME")


@audit_app.command("claims")
def audit_claims(
    file: Annotated[Path, typer.Argument(help="Where to write the labelled claims: a .jsonl file.")],
    workspace: WorkspaceOpt = Path("."),
    generation: Annotated[Optional[int], typer.Option(min=1, help="Only this generation's verdicts (default: all).")] = None,
) -> None:
    """Write every claim people have judged, on the audit page or by import, as labelled claims:
    passage, claim, evidence and label (unsupported where the person called the claim wrong,
    supported otherwise), with the person's codes and reason. It is the file `ratchet validity
    --labelled` weighs the critics with and `ratchet eval-judge --kind grounding` scores a claim
    judge on: the project's own ground truth, growing as people audit. A fail that names no
    wrong claim leaves its claims out (it does not say which was wrong); a verdict on text a
    rebuild changed counts nowhere. The file reveals the secret sample: keep it away from
    annotators and training data.

    \b
    Example:
      ratchet audit claims people.jsonl -w my-ws
      ratchet validity -w my-ws --labelled people.jsonl
      ratchet eval-judge people.jsonl --kind grounding"""
    if file.suffix != ".jsonl":
        fail(f"{file}: write the labelled claims to a .jsonl file")
    ws = open_workspace(workspace)
    try:
        con = ws.connect(read_only=True)
        written, unsupported, left_out = export_claims(con, file, generation)
        con.close()
    except (WorkspaceError, OSError) as exc:
        fail(str(exc))
    if not written:
        fail(f"no claim judged by a person{f' in generation {generation}' if generation else ''} yet: audit with "
             f"`ratchet audit serve` (tick the wrong claims) or `ratchet audit import`")
    console.print(f"wrote {written} labelled claim(s) to {file}: {unsupported} unsupported, {written - unsupported} "
                  f"supported" + (f"; left out {left_out} of fails that name no wrong claim" if left_out else "")
                  + f"\nthen: ratchet validity -w {workspace} --labelled {file}, or ratchet eval-judge {file} "
                    f"--kind grounding")


@audit_app.command("serve")
def audit_serve(
    workspace: WorkspaceOpt = Path("."),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8765,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback lets other machines reach the "
                                           "page: only with this flag, and a warning is printed.")] = "127.0.0.1",
    auditor: Annotated[list[str], typer.Option(help="Who reviews (repeat for several: each gets their own link and "
                                                    "queue; names are stored with every verdict).")] = ["auditor"],
    generation: Annotated[int, typer.Option(min=1, help="Generation whose secret sample to audit.")] = 1,
    overlap: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of items that go to two auditors, for "
                                                                  "human-human agreement.")] = 0.2,
    admin: Annotated[bool, typer.Option("--admin", help="Also print a link to the statistics page for someone "
                                                        "who reviews nothing.")] = False,
    allowed_origin: Annotated[list[str], typer.Option(
        help="Another origin the page answers, besides the one it prints (repeat for several): a reverse proxy's "
             "(https://audit.example.org) or a LAN name's (http://lab-pc:8765). With --host 0.0.0.0 the page "
             "already answers at any of this machine's IP addresses.")] = [],
) -> None:
    """A web page for human auditors: the secret samples of reflections and of the critiques that
    vote on them, one item at a time, blind (no author, critic, model, persona or score on the
    page), keyboard-driven (p pass/right, f fail/wrong, 1-9 claims, u undo,
    s skip, j/k move, ? help). Prints one start link per auditor, each usable once; verdicts go
    into the audits table as `ratchet audit import` puts them. Needs the .[web] extra.
    Ctrl-C stops the server; every submitted verdict is already saved."""
    try:
        from .web.app import ServeConfig, serve
    except ImportError as exc:
        fail(f"ratchet audit serve needs the web extra ({exc.name} is missing): pip install -e '.[web]'")
    ws = open_workspace(workspace)
    if len(set(auditor)) != len(auditor):
        fail("--auditor: each name once")
    if ":" in host:
        fail(f"--host {host}: an IPv6 address is not supported; use 127.0.0.1, or an IPv4 address or host name")
    try:
        from .web.origin import OriginError, parse_origin

        allowed = tuple(parse_origin(o) for o in allowed_origin)
    except OriginError as exc:
        fail(str(exc))
    if host not in ("127.0.0.1", "localhost"):
        err.print(f"[yellow]warning:[/] binding {host}: anyone who can reach this address and holds a start link "
                  "can audit; the page has no TLS")

    def ready(server) -> None:
        console.print(f"auditing generation {generation}: {server.total_sampled} sampled item(s) "
                      f"({server.total_sampled - server.sampled_critiques} reflection(s), {server.sampled_critiques} "
                      f"critique(s)), "
                      f"{', '.join(f'{a} {len(q)}' for a, q in server.queues.items())} (overlap {overlap:.0%})")
        for who, url in server.start_urls():
            console.print(f"[bold]{who}:[/] {url}", soft_wrap=True, highlight=False)
        console.print("each link works once, in one browser; Ctrl-C stops the server")
        if host == "0.0.0.0":
            console.print("from another machine, put this machine's IP address in place of 127.0.0.1 (any address "
                          "it listens on is answered; a host name needs --allowed-origin)", highlight=False)
        for origin in allowed:
            console.print(f"also answered at {origin}", highlight=False)

    try:
        serve(ws, ServeConfig(host=host, port=port, generation=generation, auditors=tuple(auditor), overlap=overlap,
                              admin=admin, allowed_origins=allowed), on_ready=ready)
    except (WorkspaceError, AuditError) as exc:
        fail(str(exc))


@audit_app.command("import")
def audit_import(
    file: Annotated[Path, typer.Argument(help="A reviewed export (.csv or .jsonl).")],
    auditor: Annotated[str, typer.Option(help="Who reviewed it (stored with every verdict).")],
    workspace: WorkspaceOpt = Path("."),
) -> None:
    """Read reviewed verdicts back (annotations, or critiques from `export --critiques`) and
    update the reputation they feed. Bad rows are
    reported by line and skipped; the good ones are kept (exit code 1 if any row was bad)."""
    ws = open_workspace(workspace)
    try:
        with ws.lock():
            con = ws.connect()
            imported, problems = import_verdicts(con, file, auditor, ws.config)
            stale = con.execute("SELECT (SELECT count(*) FROM audits_stale WHERE auditor = $a) + "
                                "(SELECT count(*) FROM critique_audits_stale WHERE auditor = $a)", {"a": auditor}).fetchone()[0]
            con.close()
    except (WorkspaceError, AuditError) as exc:
        fail(str(exc))
    console.print(f"imported {imported} verdict(s) by {auditor} from {file}")
    if stale:
        err.print(f"[yellow]note:[/] {stale} earlier verdict(s) by {auditor} judged text that a rebuild has changed "
                  "since: they no longer count (view audits_stale); export again to judge the new text", highlight=False)
    for line in problems:
        err.print(f"[yellow]skipped[/] {line}", highlight=False, soft_wrap=True)  # FILE:LINE kept whole
    if problems:
        raise typer.Exit(1)


def _judge_setup(workspace: Optional[Path]):
    """(config, prompts) of a workspace, or the defaults outside one."""
    from .config import RatchetConfig
    from .prompts import Prompts

    if workspace is None:
        return RatchetConfig(), Prompts()
    ws = open_workspace(workspace)
    cfg = ws.config
    return cfg, Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)


def _run_judge(kind: str, rows, cfg, prompts, model: str, cache: Optional[Path]) -> None:
    """Every row judged, with a progress bar over the model's questions; calls cached in `cache`."""
    import duckdb

    from .backends import make_backend
    from .cache import CachedBackend
    from .judges import judge, model_calls
    from .workspace import create_schema

    con = duckdb.connect(str(cache) if cache else ":memory:")
    create_schema(con)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with make_backend(cfg.engine_for(model)) as backend, Progress(*columns, console=err) as progress:
            task = progress.add_task(f"{kind} judge ({model})", total=model_calls(rows, kind))
            judge(kind, rows, CachedBackend(backend, con), prompts, cfg, lambda n: progress.advance(task, n))
    except (ModelNotFound, EngineError) as exc:
        fail(str(exc))
    finally:
        con.close()


JudgeKind = Annotated[str, typer.Argument(help="grounding (rows with passage and text, claims or claim) or harm "
                                                "(rows with prompt and response).")]
JudgeModelOpt = Annotated[Optional[str], typer.Option("--model", help="The judge's model (a GGUF path or bundled:NAME). "
                                                      "Default: \\[judges] of the workspace's config.")]
JudgeWorkspaceOpt = Annotated[Optional[Path], typer.Option("--workspace", "-w", help="Use this workspace's \\[judges], "
                                                           "engine and prompts; default: the built-in ones.")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="Keep the model's answers in this DuckDB file: a rerun asks nothing again.")]
PassageOpt = Annotated[str, typer.Option(help="grounding: the column holding the passage.")]
TextOpt = Annotated[str, typer.Option(help="grounding: the column holding the text (split into sentences) when a row "
                                           "has no claims or claim column.")]


@app.command("judge")
def judge_file(
    kind: JudgeKind,
    input: Annotated[Path, typer.Option("--input", "-i", help="JSONL, parquet or a datasets folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="JSONL: every input row with its judgement added.")],
    model: JudgeModelOpt = None,
    workspace: JudgeWorkspaceOpt = None,
    passage_field: PassageOpt = "passage",
    text_field: TextOpt = "text",
    prompt_field: Annotated[str, typer.Option(help="harm: the column holding the request.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="harm: the column holding the response.")] = "response",
    cache: CacheOpt = None,
) -> None:
    """Judge every row of a file with the configured judges and write it back with its probability.

    grounding: rows with `passage` and `text` (each sentence is a claim), `claims` (strings, or
    objects with `claim` and an optional `evidence` quote) or one `claim`. Each row gets
    `p_unsupported` (of its least supported claim), `judged_by` (rules or model) and
    `claims_judged`. Rules decide first (a number or name the passage lacks, a quote that is
    not in it); the model is asked only about the rest.

    harm: rows with `prompt` and `response`; each gets `p_harmful`.

    Both add `abstain` (true where the model's confidence is below \\[judges] abstain_below).
    Check a judge on your own labelled rows with `ratchet eval-judge` before trusting it.

    Example: ratchet judge grounding --input claims.jsonl --output judged.jsonl"""
    from .judges import KINDS, JudgeError, P_FIELD, load, output_row, write_jsonl

    if kind not in KINDS:
        fail(f"unknown judge '{kind}' (one of: {', '.join(KINDS)})")
    if output.resolve() == input.resolve():
        fail(f"{output}: the output would overwrite the input; name another file")
    cfg, prompts = _judge_setup(workspace)
    model = model or getattr(cfg.judges, kind)
    try:
        rows = load(input, kind, passage_field=passage_field, text_field=text_field, prompt_field=prompt_field,
                    response_field=response_field)
    except JudgeError as exc:
        fail(str(exc))
    _run_judge(kind, rows, cfg, prompts, model, cache)
    write_jsonl(output, [output_row(r, kind) for r in rows])
    by = Counter(r.by for r in rows)
    p = [r.p for r in rows if r.p is not None]
    console.print(f"judged {len(rows)} rows of {input} with {model}: " + ", ".join(f"{n} by {k}" for k, n in by.items())
                  + f"; {sum(r.abstain for r in rows)} abstained; mean {P_FIELD[kind]} "
                  + (f"{sum(p) / len(p):.3f}" if p else "n/a") + f"; wrote {output}", highlight=False)


def _eval_binary(kind: str, file: Path, label_field: str, label_means: str, model: Optional[str],
                 workspace: Optional[Path], limit: Optional[int], output: Optional[Path], cache: Optional[Path],
                 fields: dict) -> None:
    from .judges import JudgeError, load, output_row
    from .stats import binary_scores, coverage_scores

    cfg, prompts = _judge_setup(workspace)
    model = model or getattr(cfg.judges, kind)
    try:
        rows = load(file, kind, label_field=label_field, label_means=label_means, **fields)
    except JudgeError as exc:
        fail(str(exc))
    rows = rows[:limit] if limit else rows
    _run_judge(kind, rows, cfg, prompts, model, cache)
    scored = [r for r in rows if r.p is not None]
    m = binary_scores([r.label for r in scored], [r.p for r in scored])
    positive = {"grounding": "unsupported", "harm": "harmful"}[kind]
    ci = lambda x: "" if x is None else f" [{x[0]:.2f}, {x[1]:.2f}]"  # noqa: E731
    table = Table("judge", "n", positive, "AUC", "accuracy (p >= 0.5)", "Cohen's kappa", title=escape(
        f"{kind} judge {model} on {file} (95% bootstrap intervals)"), title_justify="left")
    fmt = lambda k: "n/a" if m[k] is None else f"{m[k]:.3f}{ci(m[k + '_ci'])}"  # noqa: E731
    table.add_row(model, str(m["n"]), str(m["positives"]), fmt("auc"), fmt("accuracy"), fmt("kappa"))
    console.print(table)
    by = Counter(r.by for r in rows)
    console.print("decided by: " + ", ".join(f"{k} {n}" for k, n in by.items()), highlight=False)
    if cfg.judges.abstain_below > 0.5 and scored:
        c = coverage_scores([r.label for r in scored], [r.p for r in scored], cfg.judges.abstain_below)
        console.print(f"abstaining below confidence {c['abstain_below']}: answers {c['answered']} of {m['n']} "
                      f"(coverage {c['coverage']:.2f}), accuracy where it answers "
                      + ("n/a" if c["accuracy_answered"] is None else f"{c['accuracy_answered']:.3f}"), highlight=False)
    if len(scored) < len(rows):
        console.print(f"[yellow]{len(rows) - len(scored)} rows without a judgement[/] (no valid answer)", highlight=False)
    if output:
        output.write_text(json.dumps({"kind": kind, "judge": model, "file": str(file), "metrics": m,
                                      "rows": [{**output_row(r, kind), "gold": r.label} for r in rows]},
                                     indent=2, default=str) + "\n", encoding="utf-8")
        console.print(f"wrote {output}")


def _detect_kind(file: Path, label_field: str) -> str:
    """grounding for rows with a passage, conscience for three-way ethical labels, else harm."""
    from .stages.conscience import LABELS, read_rows

    try:
        rows = read_rows(file)
    except ConscienceError as exc:
        fail(str(exc))
    if not rows:
        fail(f"{file}: no rows")
    if any("passage" in row for _, row in rows):
        return "grounding"
    labels = {str(row.get(label_field, "")).strip().lower() for _, row in rows}
    return "conscience" if labels <= set(LABELS) else "harm"


@app.command("eval-judge")
def eval_judge(
    file: Annotated[Path, typer.Argument(help="A labelled file: JSONL, parquet or a datasets folder.")],
    kind: Annotated[str, typer.Option(help="detect, conscience (prompt, response, label ethical|neutral|unethical under a "
                                           "framework), grounding or harm (the judges of `ratchet judge`). detect: "
                                           "grounding where rows have a passage, conscience for three-way ethical "
                                           "labels, else harm.")] = "detect",
    label_means: Annotated[str, typer.Option(help="grounding and harm: a numeric or boolean label of 1 means the row is "
                                                  "positive (unsupported / harmful); 'negative' reads 1 as supported / "
                                                  "harmless. Named labels are read by name.")] = "positive",
    model: JudgeModelOpt = None,
    workspace: JudgeWorkspaceOpt = None,
    passage_field: PassageOpt = "passage",
    text_field: TextOpt = "text",
    cache: CacheOpt = None,
    framework: Annotated[str, typer.Option(help="Framework file in prompts/frameworks/ (without .toml).")] = "three-laws",
    judge_model: Annotated[Optional[str], typer.Option("--judge", help="conscience: the judge, a GGUF path or "
                                                       "bundled:NAME (default bundled:smollm2); for grounding and "
                                                       "harm, the same as --model.")] = None,
    prompt_field: Annotated[str, typer.Option(help="Column holding the request.")] = "prompt",
    response_field: Annotated[str, typer.Option(help="Column holding the response.")] = "response",
    label_field: Annotated[str, typer.Option(help="Column holding the gold label (conscience: ethical, neutral or unethical; grounding, harm: see --label-means).")] = "label",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score only the first N pairs.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Also write the metrics and every prediction as JSON here.")] = None,
) -> None:
    """Score a conscience judge against a labelled file: accuracy, per-class precision and
    recall, Cohen's kappa and the confusion matrix. A judge's labels must be checked, not
    trusted. The bundled examples/code_hacking/judge_eval.jsonl is a small file to start with.

    For the grounding and harm judges (`ratchet judge`): AUC of their probability against the
    label, and accuracy and Cohen's kappa at p >= 0.5, each with a 95% bootstrap interval.

    Example: ratchet eval-judge labelled.jsonl --kind harm --model bundled:qwen2.5-coder-1.5b"""
    if kind not in ("detect", "conscience", "grounding", "harm"):
        fail(f"--kind {kind}: one of detect, conscience, grounding, harm")
    if label_means not in ("positive", "negative"):
        fail(f"--label-means {label_means}: positive or negative")
    kind = _detect_kind(file, label_field) if kind == "detect" else kind
    if kind != "conscience":
        return _eval_binary(kind, file, label_field, label_means, model or judge_model, workspace, limit, output, cache,
                            dict(passage_field=passage_field, text_field=text_field, prompt_field=prompt_field,
                                 response_field=response_field))
    import duckdb

    from .backends import make_backend
    from .cache import CachedBackend
    from .config import RatchetConfig
    from .prompts import Prompts
    from .stages.conscience import LABELS, judge, load_framework, load_items, readings
    from .workspace import create_schema

    cfg = RatchetConfig()
    judge_model = model or judge_model or "bundled:smollm2"
    try:
        fw = load_framework(framework, Prompts())
        items, skipped = load_items(file, prompt_field, response_field, label_field)
    except ConscienceError as exc:
        fail(str(exc))
    items = items[:limit] if limit else items
    con = duckdb.connect()  # a throwaway cache: evaluation runs outside any workspace
    create_schema(con)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with make_backend(cfg.engine_for(judge_model)) as backend, \
                Progress(*columns, console=console) as progress:
            task = progress.add_task(f"judge ({framework})", total=len(items))
            outcomes = judge([(i.prompt, i.response) for i in items], CachedBackend(backend, con), fw, cfg,
                             on_progress=lambda n: progress.advance(task, n))
    except ModelNotFound as exc:
        fail(str(exc))
    read = readings(items, outcomes)
    deciding = cfg.judgements.decide_by if cfg.judgements.decide_by in read else "generated"
    m = read[deciding]
    table = Table("class", "precision", "recall", "f1", "support", title=f"{fw.name}: judge {judge_model} on {file} "
                  f"({deciding} labels)", title_justify="left")
    for c in LABELS:
        x = m["per_class"][c]
        table.add_row(c, f"{x['precision']:.2f}", f"{x['recall']:.2f}", f"{x['f1']:.2f}", str(x["support"]))
    console.print(table)
    summary = Table("labels read as", "accuracy", "Cohen's kappa", "AUC (unethical vs rest)", "no valid label",
                    title="the same answers, read three ways", title_justify="left")
    for name, x in read.items():
        summary.add_row(name + (" (decides)" if name == deciding else ""), f"{x['accuracy']:.3f}",
                        f"{x['cohen_kappa']:+.3f}", "n/a" if x["auc_unethical"] is None else f"{x['auc_unethical']:.3f}",
                        str(x["invalid"]))
    console.print(summary)
    console.print(f"n {m['n']}; confusion (gold -> predicted, {deciding}): " + json.dumps(m["confusion"]), soft_wrap=True)
    for line in skipped:
        console.print(f"[yellow]skipped[/] {line}", highlight=False)
    if output:
        rows = [{"source": i.source, "gold": i.label, **{f"predicted_{k}": x["predicted"][n] for k, x in read.items()},
                 "probs": o.graded.raw if o.graded else None, "calibrated": o.graded.calibrated if o.graded else None,
                 "reason": o.reason, "reasons": o.record["reasons"] if o.record else None}
                for n, (i, o) in enumerate(zip(items, outcomes))]
        metrics = {k: {key: v for key, v in x.items() if key != "predicted"} for k, x in read.items()}
        output.write_text(json.dumps({"framework": framework, "judge": judge_model, "decides": deciding,
                                      "metrics": metrics, "items": rows}, indent=2) + "\n", encoding="utf-8")
        console.print(f"wrote {output}")


@app.command()
def engines(
    name: Annotated[Optional[str], typer.Argument(help="One engine: list its keys with their defaults.")] = None,
) -> None:
    """The engines a config can name with `backend = "..."` (in \\[annotator] or a member), and
    each one's keys. A key that belongs to another engine is a config error.

    Example: ratchet engines llama_server"""
    if name is not None:
        try:
            e = registry.engine(name)
        except registry.UnknownEngine as exc:
            fail(str(exc))
        table = Table("key", "default", "what", title=escape(f"engine {e.name}: {e.summary}"), title_justify="left")
        for key, field in e.config.model_fields.items():
            table.add_row(key, json.dumps(field.default), escape(field.description or ""))
        console.print(table)
        return
    table = Table("backend", "model names", "what", "keys", title="engines", title_justify="left")
    for e in registry.ENGINES.values():
        keys = [k for k in e.config.model_fields if k not in ("backend", "model")]
        table.add_row(e.name, {"gguf": "a GGUF file or bundled:NAME", "checkpoint": "a checkpoint folder",
                               "name": "a name"}.get(e.model_file, e.model_file), escape(e.summary), ", ".join(keys))
    console.print(table)
    console.print(f"default: {registry.DEFAULT}; `ratchet engines NAME` lists one engine's keys with their defaults")


@app.command()
def validity(
    workspace: WorkspaceOpt = Path("."),
    labelled: Annotated[Optional[Path], typer.Option(help="Labelled claims (JSONL, parquet or a datasets folder): "
                                                     "passage, claim, evidence (a quote of the passage) and label "
                                                     "(supported / unsupported, or 0/1 with 1 unsupported). Default: "
                                                     "the 112 claims of bench/data/demo-claims.labelled.jsonl.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=2, help="Only the first N labelled claims (a quick look; the "
                                                 "interval widens and the weights shrink).")] = None,
    write: Annotated[Optional[Path], typer.Option(help="Also write the measurements as JSONL here (the bundled "
                                                  "critics' ship as prompts/critic_validity.jsonl).")] = None,
) -> None:
    """Measure each critic of the workspace's ensemble on claims a person labelled, and store what
    its votes weigh. Every labelled claim becomes a reflection of that one claim; each critic
    scores it as in a build, and its AUC (a supported claim scored above an unsupported one) with
    a 95% bootstrap interval gives its vote weight: 2 x the interval's lower end - 1, floored at 0.
    A critic at or below chance weighs 0 and a build no longer asks it (audit.vote_weights =
    "validity", the default). A measurement holds for the model's weights and the prompts it was
    asked with: change either and the critic is unmeasured again (weight 0.5) until this runs.
    Answers are cached in the workspace: a rerun is free.

    \b
    Example:
      ratchet validity -w my-ws                       # about 10 s a claim per model critic on 2 cores
      ratchet validity -w my-ws --labelled my-claims.jsonl
    """
    from .ensemble import Ensemble
    from .judges import JudgeError, write_jsonl
    from .measure import measure_critics
    from .resources import LABELLED_CLAIMS

    ws = open_workspace(workspace)
    cfg, prompts = _judge_setup(workspace)
    path = labelled or LABELLED_CLAIMS
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with ws.lock(), Ensemble(cfg) as ensemble, Progress(*columns, console=console) as progress:
            con = ws.connect()
            def on_critic(name: str, total: int):
                task = progress.add_task(f"critic {name}", total=total)
                return lambda n: progress.advance(task, n)
            rows = measure_critics(ensemble, prompts, cfg, con, path, limit, on_critic)
            con.close()
    except (JudgeError, EnsembleError, ModelNotFound, WorkspaceError) as exc:
        fail(str(exc))
    table = Table("critic", "claims (unsupported)", "AUC [95% CI]", "vote weight", "seconds",
                  title=f"critics on {path.name}", title_justify="left")
    for m in rows:
        auc = "n/a" if m.auc is None else f"{m.auc:.2f} [{m.auc_low:.2f}, {m.auc_high:.2f}]"
        table.add_row(m.critic, f"{m.n} ({m.positives})" + (f", {m.unjudged} unjudged" if m.unjudged else ""), auc,
                      f"{m.weight:.2f}" + ("  not informative: not asked" if m.weight == 0 else ""), f"{m.seconds:.0f}")
    console.print(table)
    if write:
        write_jsonl(write, [dataclasses.asdict(m) for m in rows])
        console.print(f"wrote {write}")
    if cfg.audit.vote_weights != "validity":
        console.print(f"[yellow]note:[/] audit.vote_weights = {cfg.audit.vote_weights}: builds do not use these weights")


def _vote_weights_table(ws: Workspace) -> None:
    """What each critic's vote weighs in the next build, and the measurement behind it."""
    import duckdb

    from .stages.scrutinize import PRIOR_WEIGHT, config_critics, measured_validity, vote_weights
    from .workspace import create_schema

    cfg, prompts = _judge_setup(ws.root)
    critics = config_critics(cfg)
    verifiers = [m.display_name for m in cfg.ensemble.members if m.kind == "verifier"]
    names = [name for name, _, _ in critics] + verifiers
    try:
        con = ws.connect(read_only=True) if ws.db_path.exists() else duckdb.connect()
        if not ws.db_path.exists():
            create_schema(con)
        measured = measured_validity(con, critics, verifiers, prompts, cfg)
        last = con.execute("SELECT max(generation) FROM annotations").fetchone()[0] or 0
        weights = vote_weights(con, last + 1, cfg.audit.vote_weights, measured)
        con.close()
    except WorkspaceError as exc:
        fail(str(exc))
    table = Table("critic", "measured on", "AUC [95% CI]", f"vote weight (generation {last + 1})",
                  title=f"vote weights (audit.vote_weights = {cfg.audit.vote_weights})", title_justify="left")
    for name in names:
        m = measured.get(name)
        unknown = name in [n for n, _, digest in critics if digest is None]
        on = f"{m.labelled}: {m.n} claims, {m.measured_at[:10]}" if m else \
            "no local model file: its weight shows in the build summary" if unknown else "not measured (`ratchet validity`)"
        auc = "—" if not m or m.auc is None else f"{m.auc:.2f} [{m.auc_low:.2f}, {m.auc_high:.2f}]"
        w = weights.get(name, PRIOR_WEIGHT)
        table.add_row(name, escape(on), auc, f"{w:.2f}" + ("  not informative: not asked" if w <= 0 else ""))
    console.print(table)


@app.command()
def panel(workspace: WorkspaceOpt = Path(".")) -> None:
    """What each critic's vote weighs (its measured validity, `ratchet validity`), then the
    ratchet's reference panel as the workspace's first generation froze it: each member's
    frozen weight (its vote weight then; 0: not informative, never asked), engine and model hash, its sampling, what it is asked with (prompt files, persona, schemas,
    the engine `auto` resolved to, how judgements are read) and, for a served model, the model id
    its server reported and its answers to the fixed probes. A build refuses to score when any of
    it changed, naming what.

    \b
    Example:
      ratchet panel -w my-ws
    """
    from .cache import sha256
    from .stages.ratchet import PANEL

    ws = open_workspace(workspace)
    _vote_weights_table(ws)
    if not ws.db_path.exists():
        fail(f"{ws.root}: no database yet; the panel is frozen by the first `ratchet build`")
    try:
        con = ws.connect(read_only=True)
        rows = PANEL.read(con, "true ORDER BY name") if PANEL.exists(con) else []
    except WorkspaceError as exc:
        fail(str(exc))
    if not rows:
        fail(f"{ws.root}: no panel frozen yet; the first `ratchet build` freezes it")
    table = Table("member", "since gen", "weight", "engine / model", "model hash", "sampling", "asked with",
                  title="reference panel (frozen)", title_justify="left")
    for p in rows:
        engine = p.engine.get("kind") or f"{(p.questions or {}).get('engine') or p.engine.get('backend')} / " \
                                          f"{p.engine.get('model', '')}"
        sampling = ", ".join(f"{k} {v}" for k, v in p.sampling.items()) or "—"
        files = {k: v for k, v in (p.questions or {}).items() if k not in ("engine", "decide_by")}
        if p.engine.get("kind"):
            asked = "its check's version"
        elif not p.questions:
            asked = "not recorded yet (its next build records it)"
        else:
            asked = (f"engine {p.questions.get('engine')}, judgements {p.questions.get('decide_by')}, {len(files)} "
                     f"prompt/persona/schema files (digest {sha256(files)[:12]})")
        if p.fingerprint:
            asked += f"; served model {p.fingerprint.get('reported_model')}, probe answers {p.fingerprint.get('answers')}"
        weight = "same for all (frozen before weights)" if p.weight is None else \
            f"{p.weight:.2f}" + ("  not informative: not asked" if p.weight <= 0 else "")
        table.add_row(f"{p.name} ({p.persona}, {p.family})", str(p.since_generation), weight, escape(engine),
                      p.model_hash[:16], sampling, escape(asked))
    console.print(table)
    console.print('each file\'s sha256: ratchet sql -w WS "SELECT name, questions FROM panel"', highlight=False,
                  markup=False)


@app.command()
def status(workspace: WorkspaceOpt = Path(".")) -> None:
    """What a workspace holds: config, ensemble members and their engines, generations built, cache size."""
    ws = open_workspace(workspace)
    cfg = ws.config
    table = Table(show_header=False, title=str(ws.root), title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("config", str(ws.config_path))
    table.add_row("corpus", str(ws.resolve(cfg.corpus.path)))
    # Which engine runs, and why ("[server]" in it is no markup).
    table.add_row("engine", escape(registry.explain(cfg.annotator)))
    for m in cfg.ensemble.members:
        where = registry.where(m.engine(cfg.annotator))
        table.add_row(f"member {m.display_name}", f"{where}; persona {m.persona}; {', '.join(m.roles)}")
    table.add_row("critique", f"k = {cfg.ensemble.k} critic(s) per annotation, threshold {cfg.ensemble.threshold}")
    x = cfg.executor
    table.add_row("executor", "local (this process)" if x.kind == "local" else
                  f"ray at {x.address or 'Ray default'}: {x.concurrency} actor(s) per engine, "
                  f"{x.num_cpus:g} CPU(s) and {x.num_gpus:g} GPU(s) each"
                  + "".join(f"; {name}: " + ", ".join(f"{k} {v}" for k, v in own.model_dump().items() if v is not None)
                            for name, own in x.stages.items()))
    table.add_row("audit", f"rate {cfg.audit.rate:.0%}, model auditor {cfg.audit.auditor or 'none (humans only)'}")
    c = cfg.conscience
    table.add_row("conscience", f"items {ws.resolve(c.items)}, frameworks {', '.join(c.frameworks)}, frozen judge {c.judge}"
                  if c.items else "off (set conscience.items)")
    table.add_row("consent gate", ", ".join(cfg.consent.judges) or "off (set consent.judges)")
    people: dict[int, tuple[int, int]] | None = None  # generation -> people's (verdicts, passes) on kept reflections
    if ws.db_path.exists():
        try:
            with closing(ws.connect(read_only=True)) as con:
                calls, passages = con.execute("SELECT (SELECT count(*) FROM model_calls), (SELECT count(*) FROM passages)").fetchone()
                builds = con.execute("SELECT generation, status, finished_at FROM builds ORDER BY started_at DESC LIMIT 1").fetchall()
                people = people_on_kept(con)
            table.add_row("passages stored", str(passages))
            table.add_row("cached model calls", str(calls))
            if builds:
                table.add_row("last build", f"generation {builds[0][0]}: {builds[0][1]} ({builds[0][2] or 'not finished'})")
        except WorkspaceError as exc:
            table.add_row("database", str(exc))
    gens = sorted(p.name for p in ws.generations_dir.glob("gen-*")) if ws.generations_dir.exists() else []
    table.add_row("generations", ", ".join(gens) or "none yet")
    for name in gens:  # what each generation's build cost per reflection it kept, and what people found of them
        manifest = compiled_manifest(ws.generations_dir / name) or {}
        metrics = manifest.get("metrics") or {}
        if "per_kept_reflection" in metrics:
            table.add_row(f"  {name} per kept reflection", _per_kept(metrics["per_kept_reflection"])
                          + f"; prompt tokens {_prompt_tokens(metrics)}")
        if (kept := (metrics.get("per_kept_reflection") or {}).get("kept")) and people is not None:
            read = people.get(int(name.split("-")[-1]), (0, 0))
            table.add_row(f"  {name} faithful", faithful_per_minute(*read, kept, metrics.get("seconds", 0.0)))
    console.print(table)


if __name__ == "__main__":
    app()
