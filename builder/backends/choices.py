"""The distribution over a judgement's allowed values, read from token log-probabilities.

A judging schema ends with its decision (`"verdict": "survives" | "revise" | "reject"`, a
label, yes/no, pass/fail). Where the engine gives the top-K log-probabilities of every
generated token, the distribution over the values is read at the token where the decision's
value begins: the model's raw next-token distribution there, kept to the tokens that can begin
one of the allowed values and normalised over them, which is what a grammar allowing only
those values samples from at temperature 1. A token that begins more than one value ("re" of
"revise" and "reject") is followed one token further: along the generated path from the next
step's top-K, elsewhere with a `probe` (one more short request, the same prompt plus that
token). Values whose tokens fall outside the top-K get no mass; when no allowed token is in
the top-K, there is no distribution (None), and the caller falls back (samples, or the
decoded value alone).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

TOP_K = 20  # top log-probabilities asked of an engine per generated token


@dataclass
class Step:
    """One generated token: its id, its text and the top-K alternatives at its position (token
    id -> (text, logprob)), or a function that reads them when asked (an in-process engine
    evaluates a position only if the decision needs it)."""
    token: int
    text: str
    top: dict[int, tuple[str, float]] | Callable[[], dict[int, tuple[str, float]]]

    def alternatives(self) -> dict[int, tuple[str, float]]:
        if callable(self.top):
            self.top = self.top()
        return self.top


Probe = Callable[[list[int]], dict[int, tuple[str, float]]]  # generated ids so far -> next-token top-K


def read_decision(decision: tuple[str, Sequence[str]], text: str, steps: Sequence[Step],
                  probe: Probe | None = None) -> dict | None:
    """A Response.decision: the distribution over (field, choices) read from an engine's steps,
    or None when it cannot be read."""
    field, choices = decision
    found = choice_logprobs(text, steps, field, choices, probe)
    return None if found is None else {"field": field, "logprobs": found, "method": "logprobs"}


def value_start(text: str, field: str) -> int | None:
    """Index in `text` where the last string value of `field` begins (after its opening quote)."""
    found = list(re.finditer(r'"' + re.escape(field) + r'"\s*:\s*"', text))
    return found[-1].end() if found else None


def choice_logprobs(text: str, steps: Sequence[Step], field: str, choices: Sequence[str],
                    probe: Probe | None = None) -> dict[str, float] | None:
    """{value: log-probability} over `choices` (normalised), or None when it cannot be read."""
    start = value_start(text, field)
    if start is None or not "".join(s.text for s in steps).startswith(text):
        return None  # no decision field, or token texts that do not spell the output (a stop string may cut it)
    offset = 0
    for j, step in enumerate(steps):
        if offset <= start < offset + len(step.text):
            lead = text[offset:start]  # what the token holds before the value (e.g. a space and the quote)
            mass = _mass(steps, j, lead, "", list(choices), [s.token for s in steps[:j]], 1.0, probe, depth=0)
            total = sum(mass.values())
            if total <= 0:
                return None
            return {c: (math.log(mass[c] / total) if mass[c] > 0 else -math.inf) for c in choices}
        offset += len(step.text)
    return None


def _consistent(spelled: str, choices: list[str]) -> list[str]:
    """The values a value that begins with `spelled` can still be (a finished value may be
    followed by its closing quote)."""
    return [c for c in choices if c.startswith(spelled) or (spelled.startswith(c) and spelled[len(c):][:1] in ('"', ""))]


def _mass(steps, j: int, lead: str, spelled: str, choices: list[str], path: list[int], weight: float,
          probe: Probe | None, depth: int) -> dict[str, float]:
    out = dict.fromkeys(choices, 0.0)
    if depth > 4:
        return out
    if j >= len(steps):
        return out
    top, on_path = steps[j].alternatives(), steps[j].token
    for token, (tok_text, lp) in top.items():
        if not tok_text.startswith(lead):
            continue
        now = spelled + tok_text[len(lead):]
        if not now and lead:
            continue  # the token is only the lead: it does not begin a value
        fits = _consistent(now, choices)
        p = weight * math.exp(lp)
        if len(fits) == 1:
            out[fits[0]] += p
        elif len(fits) > 1:  # begins several values: one token further
            if token == on_path:
                deeper = _mass(steps, j + 1, "", now, fits, path + [token], p, probe, depth + 1)
            elif probe is not None:
                nxt = probe(path + [token])
                deeper = _mass([Step(-1, "", nxt)], 0, "", now, fits, path + [token], p, probe, depth + 1)
            else:
                deeper = {c: p / len(fits) for c in fits}  # no way to look further: an even split
            for c, m in deeper.items():
                out[c] += m
    return out


def to_probs(logprobs: dict[str, float] | None) -> dict[str, float] | None:
    return None if logprobs is None else {c: math.exp(lp) for c, lp in logprobs.items()}


def top_k(logits, text_of: Callable[[int], str], k: int = TOP_K) -> dict[int, tuple[str, float]]:
    """The top-k of a row of raw logits (numpy) as {token id: (text, log-probability)}."""
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max()
    logz = math.log(float(np.exp(shifted).sum()))
    ids = np.argpartition(-shifted, k)[:k]
    return {int(i): (text_of(int(i)), float(shifted[i] - logz)) for i in ids}
