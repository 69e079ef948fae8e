"""Scores of a binary judge against labels, with percentile-bootstrap intervals.

scikit-learn computes the metrics; this module only resamples them. One helper for every
interval a judge table reports (fixed seed: a rerun prints the same interval).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np

BOOTSTRAP = 1000  # resamples per interval


def bootstrap(metric: Callable[..., float | None], *columns: Sequence, n: int = BOOTSTRAP,
              seed: int = 0) -> tuple[float, float] | None:
    """The 95% percentile-bootstrap interval of metric(*columns) over rows drawn with
    replacement; resamples where the metric is undefined (one class only) are skipped."""
    arrays = [np.asarray(c) for c in columns]
    size = len(arrays[0])
    if size < 2:
        return None
    values = [metric(*(a[rows] for a in arrays)) for rows in resampled_rows(size, n, seed)]
    return percentile_interval(np.array([np.nan if v is None else v for v in values], dtype=float))


def resampled_rows(size: int, n: int = BOOTSTRAP, seed: int = 0) -> Iterator[np.ndarray]:
    """The rows each resample draws, one call of the seeded generator per resample, one resample
    at a time (the ratchet's bootstrap runs over every passage of a corpus)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield rng.integers(0, size, size)


def percentile_interval(values: np.ndarray) -> tuple[float, float] | None:
    """The 2.5th and 97.5th percentiles of the defined values (NaN: a resample where the metric is not)."""
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return round(float(low), 4), round(float(high), 4)


def _auc(labels, scores) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(set(labels.tolist())) == 2 else None


def _accuracy(labels, predicted) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predicted))


def _kappa(labels, predicted) -> float | None:
    from sklearn.metrics import cohen_kappa_score

    if len(set(labels.tolist()) | set(predicted.tolist())) < 2:
        return None  # one value throughout: agreement beyond chance is undefined
    return float(cohen_kappa_score(labels, predicted))


def resample_counts(size: int, n: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """(n, size): how many times each row is drawn in each resample, from the very draws
    `bootstrap` makes, so both give one interval."""
    return np.stack([np.bincount(rows, minlength=size) for rows in resampled_rows(size, n, seed)])


def resampled_binary(y: np.ndarray, s: np.ndarray, decided: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """AUC, accuracy and Cohen's kappa of every resample at once (NaN where undefined), from the
    row counts: the same values scikit-learn gives on each resample (tests/test_judges.py checks
    it), without its per-call checks, which made 3,000 calls take 10 s an interval table.
    AUC is Mann-Whitney's: the share of (positive, negative) pairs ranked right, a tie counting
    half, as the ROC curve's area is."""
    size = len(y)
    pos, neg = y == 1, y == 0
    right = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
    n_pos, n_neg = counts[:, pos].sum(1), counts[:, neg].sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((counts[:, pos] @ right) * counts[:, neg]).sum(1) / (n_pos * n_neg)
        agree = counts @ (y == decided) / size
        label_1, decided_1 = counts @ (y == 1) / size, counts @ (decided == 1) / size
        chance = label_1 * decided_1 + (1 - label_1) * (1 - decided_1)
        one_value = ((label_1 == 0) & (decided_1 == 0)) | ((label_1 == 1) & (decided_1 == 1))
        kappa = np.where(one_value, np.nan, (agree - chance) / (1 - chance))
    return {"auc": auc, "accuracy": agree, "kappa": kappa}


def binary_scores(labels: Sequence[int], p: Sequence[float], threshold: float = 0.5) -> dict:
    """AUC of p for the positive class, and accuracy and Cohen's kappa of p >= threshold, each
    with its bootstrap interval. Labels are 1 (positive: unsupported, harmful) or 0."""
    y, s = np.asarray(labels, dtype=int), np.asarray(p, dtype=float)
    decided = (s >= threshold).astype(int)
    out = {"n": int(len(y)), "positives": int(y.sum()), "threshold": threshold}
    resampled = resampled_binary(y, s, decided, resample_counts(len(y))) if len(y) >= 2 else {}
    for name, metric, column in (("auc", _auc, s), ("accuracy", _accuracy, decided), ("kappa", _kappa, decided)):
        value = metric(y, column) if len(y) else None
        out[name] = None if value is None else round(value, 4)
        out[f"{name}_ci"] = percentile_interval(resampled[name]) if value is not None and resampled else None
    return out


def coverage_scores(labels: Sequence[int], p: Sequence[float], abstain_below: float) -> dict:
    """Selective judging (Trust or Escalate, Jung et al. 2024): the judge answers only where its
    confidence max(p, 1 - p) reaches `abstain_below` and abstains elsewhere. The share it
    answers (coverage) and its accuracy there."""
    y, s = np.asarray(labels, dtype=int), np.asarray(p, dtype=float)
    answered = np.maximum(s, 1 - s) >= abstain_below
    kept = int(answered.sum())
    return {"abstain_below": abstain_below, "coverage": round(kept / len(y), 4) if len(y) else None,
            "answered": kept, "accuracy_answered": round(_accuracy(y[answered], (s[answered] >= 0.5).astype(int)), 4)
            if kept else None}


def paired_interval(matrix, items_drawn, seeds_drawn) -> dict:
    """Mean and bootstrap 95 % interval of a (seeds x items) matrix of per-item values: each
    resample draws items, and training seeds, with replacement. The draws are shared by every
    arm, so a difference's interval is paired by item and by seed. NaN marks a missing value
    (an answer no judge could label): left out of every mean; all missing gives None."""
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    if np.isnan(m).all():
        return {"mean": None, "low": None, "high": None}
    rows = seeds_drawn % m.shape[0]  # the base model has one row: every seed draw is that row
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample of missing values only
            means = np.nanmean(m[rows[:, :, None], items_drawn[:, None, :]], axis=(1, 2))
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return {"mean": round(float(np.nanmean(m)), 4), "low": round(float(low), 4), "high": round(float(high), 4)}
