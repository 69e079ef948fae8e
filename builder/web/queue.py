"""Who audits what, in which order, under which names: no web code here.

Items are the generation's secret audit samples (what `ratchet audit export` writes): the
annotations, and the critiques that are votes on them (is the critique right?). Each goes
to one auditor, and a share `overlap` of them to a second one, so that human-human agreement
can be measured. Assignment and order are keyed hashes under the workspace's audit secret:
stable across restarts of the server (an auditor resumes the same queue), unpredictable
without the secret, and shuffled per auditor. A page never sees an item's identity: each
auditor session names items by opaque ids drawn from its own random key.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field

from ..stages.audit import (SampledCritique, SampledItem, critique_sample, escalated, escalated_critiques, sample,
                            sampled_critiques, sampled_items)

# (passage id, annotator) of an annotation, (passage id, annotator, critic) of a critique: never sent to a browser
Key = tuple[str, ...]
Item = SampledItem | SampledCritique


def _unit(secret: bytes, *parts: str) -> float:
    digest = hmac.new(secret, "\x1f".join(parts).encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(keys: list[Key], auditors: list[str], secret: bytes, overlap: float,
           lead: list[Key] = ()) -> dict[str, list[Key]]:
    """auditor -> their items. Primary auditor by hash; a share `overlap` of items (by another
    hash) also goes to a second, different auditor. The items in `lead` (a judge abstained:
    they need a person) lead every queue they are in, in their order (the least sure first)."""
    rank = {k: i for i, k in enumerate(lead)}
    out: dict[str, list[Key]] = {a: [] for a in auditors}
    n = len(auditors)
    for key in keys:
        first = int(_unit(secret, "serve-assign", *key) * n)
        out[auditors[first]].append(key)
        if n > 1 and _unit(secret, "serve-overlap", *key) < overlap:
            second = (first + 1 + int(_unit(secret, "serve-second", *key) * (n - 1))) % n
            out[auditors[second]].append(key)
    for auditor, items in out.items():  # shuffled per auditor, the same on every start
        items.sort(key=lambda k: (rank.get(k, len(rank)), _unit(secret, "serve-order", auditor, *k)))
    return out


@dataclass
class AuditorQueue:
    """One auditor's session: their items in their order, under opaque ids."""
    auditor: str
    items: list[Item]
    admin: bool = False
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    _salt: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    skipped: set[Key] = field(default_factory=set)
    # verdicts submitted in this session, for undo: the item and the verdict it replaced (or None)
    history: list[tuple[Key, object]] = field(default_factory=list)
    saw_stats: bool = False
    # a refused verdict's form as the auditor left it (ticks, codes, reason) and why, shown once
    # on the item's page (Post/Redirect/Get: a reload resubmits nothing)
    drafts: dict[Key, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.by_id = {self.opaque(x): x for x in self.items}
        self.by_key = {x.key: x for x in self.items}

    def replace(self, x: Item) -> None:
        """The item as it reads now (a rebuild changed it): same place, same opaque id."""
        old = self.by_key[x.key]
        x.needs_person = old.needs_person
        self.items[self.items.index(old)] = x
        self.__post_init__()

    def drop(self, key: Key) -> None:
        """An item a rebuild took out of the sample."""
        self.items = [x for x in self.items if x.key != key]
        self.skipped.discard(key)
        self.__post_init__()

    def opaque(self, x: Item) -> str:
        return hmac.new(self._salt, "\x1f".join(x.key).encode(), hashlib.sha256).hexdigest()[:20]

    def position(self, x: Item) -> int:
        return self.items.index(x)

    def next_open(self, done: "Collection[Key]") -> Item | None:
        """The first item without a verdict that was not skipped; then the skipped ones."""
        open_ = [x for x in self.items if x.key not in done]
        fresh = [x for x in open_ if x.key not in self.skipped]
        return (fresh or open_ or [None])[0]


def escalated_first(why: dict, sampled: list, read) -> list:
    """The items a judge abstained on (`why`: key -> why, least sure first), then the rest of the
    secret sample, read by `read(keys)`, each escalated one carrying why."""
    items = read([*why, *(k for k in sampled if k not in why)])
    for x in items:
        x.needs_person = why.get(x.key)
    return items


def load_sample(con, secret: bytes, generation: int, rate: float) -> list[SampledItem]:
    """The items a person audits: those a judge abstained on (each with why), then the secret sample."""
    return escalated_first(escalated(con, generation), sample(con, secret, generation, rate),
                           lambda keys: sampled_items(con, keys, generation))


def load_critiques(con, secret: bytes, generation: int, rate: float) -> list[SampledCritique]:
    """The critiques a person audits: those whose critic abstained (each with why), then the
    secret critique sample (`ratchet audit export`'s)."""
    return escalated_first(escalated_critiques(con, generation), critique_sample(con, secret, generation, rate),
                           lambda keys: sampled_critiques(con, keys, generation))


def reload(con, x: Item, generation: int) -> Item | None:
    """The item as it reads now, or None where a rebuild took it out of the sample."""
    now = (sampled_critiques if isinstance(x, SampledCritique) else sampled_items)(con, [x.key], generation)
    return now[0] if now else None
