"""`ratchet validity`: each critic of an ensemble measured on claims a person labelled.

A labelled claim (`passage`, `claim`, `evidence`, `label` supported / unsupported, as in
bench/data/demo-claims.labelled.jsonl) becomes a reflection of that one claim
(validity.one_claim_record); every critic scores it as it scores a build's reflections
(P(survives) + 0.5 P(revise)), the grounding verifier by its share of verified quotes. The AUC of
the scores against the labels, with its 95% bootstrap interval, gives the critic's vote weight
(validity.vote_weight): a critic at chance weighs 0 and a build no longer asks it.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from . import verifier
from .cache import CachedBackend
from .judges import JudgeError, load
from .stages.base import run_task
from .stages.scrutinize import (CRITIC_VALIDITY, VERDICT_POINTS, CritiqueTask, Measured, Task, critic_keys,
                                critic_sampling, ensemble_critics)
from .stats import binary_scores
from .validity import one_claim_record, vote_weight

def labelled_tasks(path: Path, limit: int | None = None) -> tuple[list[Task], list[int]]:
    """(one-claim reflections to critique, labels: 1 unsupported, 0 supported) of a labelled file;
    a row without a passage, one claim with its evidence, or a label is an error naming its line."""
    rows = load(path, "grounding", label_field="label")
    for row in rows:
        if len(row.claims) != 1 or not row.claims[0].evidence:
            raise JudgeError(f"{row.source}: each labelled row needs one 'claim' and its 'evidence' (a quote of the "
                             "passage), besides 'passage' and 'label'")
    rows = rows[:limit] if limit else rows
    tasks = [Task(str(r.data.get("passage_id") or r.source), r.passage, f"labelled:{i}",
                  one_claim_record(r.claims[0].claim, r.claims[0].evidence)) for i, r in enumerate(rows)]
    return tasks, [r.label for r in rows]


def measurement(name: str, key: str, path: Path, labels: list[int], scores: list[float | None],
                seconds: float) -> Measured:
    """A critic's scores against the labels: AUC (a supported claim above an unsupported one),
    its interval and the vote weight."""
    judged = [(y, s) for y, s in zip(labels, scores) if s is not None]
    m = binary_scores([y for y, _ in judged], [1 - s for _, s in judged])
    low, high = m["auc_ci"] or (None, None)
    return Measured(name, key, path.name, hashlib.sha256(path.read_bytes()).hexdigest(), len(judged), m["positives"],
                    m["auc"], low, high, vote_weight(low), len(labels) - len(judged), round(seconds, 1),
                    datetime.now(timezone.utc).isoformat(timespec="seconds"))


def measure_critics(ensemble, prompts, cfg, con, path: Path, limit: int | None = None,
                    on_critic: Callable[[str, int], Callable[[int], None]] | None = None) -> list[Measured]:
    """Every critic of the ensemble (and every verifier) on the labelled file, stored in
    critic_validity. on_critic(name, total) returns a progress callback for that critic."""
    tasks, labels = labelled_tasks(path, limit)
    keys = critic_keys(ensemble_critics(ensemble), [v.name for v in ensemble.verifiers], prompts, cfg)
    out = []
    for critic in ensemble.critics:
        start = time.perf_counter()
        task = CritiqueTask(prompts, critic_sampling(cfg, critic), 0, critic, judging=cfg.judgements)
        rows = run_task(task, tasks, CachedBackend(critic.backend, con), on_critic(critic.name, len(tasks)) if on_critic else None)
        scores = [(r.score if r.score is not None else VERDICT_POINTS[r.verdict]) if r.status == "accepted" else None
                  for r in rows]
        out.append(measurement(critic.name, keys[critic.name], path, labels, scores, time.perf_counter() - start))
    for v in ensemble.verifiers:
        start = time.perf_counter()
        scores = [verifier.check(t.passage, t.record).share for t in tasks]
        out.append(measurement(v.name, keys[v.name], path, labels, scores, time.perf_counter() - start))
    CRITIC_VALIDITY.insert(con, out, on_conflict="replace")
    return out
