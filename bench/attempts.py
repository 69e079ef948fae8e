"""Why a build's writer attempts were rejected: every answer, not only each passage's last.

A build records the reason of each passage's last attempt; the retries before it cost as much
decoding and leave only their answers in the call cache. This reads every answer of the
workspace's writer (the model that wrote the most tokens) back from `model_calls`, finds its
passage (the gates' grammar makes every claim's evidence a span of it), and checks it again with
the annotate stage's own task under the workspace's config and prompts: the schema, then the rule
gates and the injection veto (AnnotateTask.check; not the note judge, a model). An
answer tied to no passage (not JSON, or quotes that no single passage holds) counts among every
attempt but not among the first ones. It prints the first attempts' verdicts, every attempt's, and the
writer's completion tokens spent on rejected answers.

Usage: python bench/attempts.py WORKSPACE
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.backends.base import Response  # noqa: E402
from builder.corpus import Passage  # noqa: E402
from builder.prompts import Prompts  # noqa: E402
from builder.stages.annotate import AnnotateTask, Candidate  # noqa: E402
from builder.structured import check_output, validator_for  # noqa: E402
from builder.workspace import Workspace, WorkspaceError  # noqa: E402


def verdict(task: AnnotateTask, response: Response, passage: str) -> str:
    """The stage's verdict, cut to its kind ("accepted", or the reason up to its first detail)."""
    item = Candidate(Passage("", "", 0, passage, 0))
    record, invalid = check_output(response, validator_for(task.schema(item)), task.sampling.at_bound)
    if record is None:
        return invalid.split(":")[0]
    record.pop("_trimmed", None)
    _, gated, veto = task.gated(item, record, rewrite=False)  # the gates' own verdict, the lift aside
    if veto is None:
        return "accepted"
    # the reflection is checked before the claims: say whether a claim had passed, so that the answer
    # is kept and its reflection asked again (annotate.rewrite_reflection)
    verified = any(c["verdict"] == "supported" for c in gated.claim_checks or [])
    kind, _, detail = veto.partition(":")
    if kind == "reflection":
        return kind + (" (a claim verified)" if verified else " (no claim verified)")
    return kind + (":" + detail[:45] if detail else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workspace", type=Path)
    args = parser.parse_args()
    try:
        ws = Workspace(args.workspace)
        cfg, con = ws.config, ws.connect(read_only=True)
    except WorkspaceError as exc:
        sys.exit(str(exc))
    passages = [t for (t,) in con.execute("SELECT text FROM passages").fetchall()]
    writer = con.execute("SELECT model_id FROM model_calls GROUP BY model_id "
                         "ORDER BY sum(completion_tokens) DESC NULLS LAST LIMIT 1").fetchone()
    if writer is None:
        sys.exit(f"{args.workspace}: no model call is stored (build it first)")
    writer = writer[0]
    calls = con.execute("SELECT response, finish_reason, completion_tokens FROM model_calls WHERE model_id = ? "
                        "ORDER BY created_at", [writer]).fetchall()
    con.close()
    prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)  # as builder/build.py
    task = AnnotateTask(prompts, cfg, 1, "writer")
    attempts: dict[int | None, list[tuple[str, int]]] = collections.defaultdict(list)
    asked_again: list[int] = []  # completion tokens of each reflection asked again alone
    for response, finish, tokens in calls:
        try:
            record = json.loads(response)
        except json.JSONDecodeError:
            attempts[None].append(("not JSON" if finish == "stop" else f"cut off ({finish})", tokens or 0))
            continue
        if isinstance(record, dict) and set(record) == {"reflection"}:  # a reflection asked again (ReproseTask)
            asked_again.append(tokens or 0)
            continue
        # the passage that holds every quote (a clause two passages share names neither alone)
        quotes = [c["evidence"] for c in record.get("claims", []) if isinstance(c, dict) and c.get("evidence")]
        holders = [i for i, p in enumerate(passages) if quotes and all(q in p for q in quotes)]
        found = holders[0] if len(holders) == 1 else None
        attempts[found].append(("no one passage holds its quotes" if found is None else
                                verdict(task, Response(response, finish), passages[found]), tokens or 0))
    first = collections.Counter(v[0][0] for k, v in attempts.items() if k is not None)
    every = collections.Counter(a for v in attempts.values() for a, _ in v)
    wasted = sum(t for v in attempts.values() for a, t in v if a != "accepted")
    total = sum(t for v in attempts.values() for _, t in v)
    placed = sum(len(v) for k, v in attempts.items() if k is not None)
    answered = len([k for k in attempts if k is not None])  # passages with an answer of their own
    print(f"{len(calls) - len(asked_again)} writer answers for {len(passages)} passages ({placed - answered} retries), "
          f"and {len(asked_again)} reflections asked again alone ({sum(asked_again)} completion tokens); "
          f"{len(calls) - len(asked_again) - placed} answers tied to no passage (not JSON, cut off, or quotes that no single "
          f"passage holds): counted under every attempt only")
    for title, counts in (("first attempts", first), ("every attempt", every)):
        print(f"\n{title}:")
        for what, n in counts.most_common():
            print(f"  {n:>4}  {what}")
    print(f"\ncompletion tokens on rejected answers: {wasted} of {total} ({wasted / total:.0%})" if total else "")


if __name__ == "__main__":
    main()
