"""The ensemble: members that differ in substrate (model family) and perspective (persona).

Members that share an engine config share one loaded model: two personas of SmolLM2 are one
llama.cpp instance with two system prompts. Critics for an annotation are chosen to differ
from its author, another family first, then another persona; a critic identical to the
author in both proves nothing and is never chosen.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .backends import Backend, make_backend
from .backends.registry import check_model
from .config import MemberConfig, RatchetConfig
from .models import ModelNotFound
from .verifier import GroundingVerifier


class EnsembleError(Exception):
    """An ensemble that cannot work as configured; the message names the member or key."""


@dataclass
class Member:
    name: str
    persona: str
    roles: list[str]
    temperature: float | None
    backend: Backend
    few_shot: bool = True  # shown the prompt's few-shot annotation examples
    best_of: int | None = None  # candidates sampled per passage (None: annotate.best_of)

    @property
    def family(self) -> str:
        return self.backend.family

    def differs_from(self, other: "Member") -> bool:
        return self.family != other.family or self.persona != other.persona


def _engine_key(cfg) -> str:
    return json.dumps(cfg.model_dump(), sort_keys=True)


class Ensemble:
    """Loads every member's engine (once per distinct engine config); close() frees them."""

    def __init__(self, config: RatchetConfig):
        self.k = config.ensemble.k
        self.members: list[Member] = []  # the language models
        self.verifiers: list[GroundingVerifier] = []  # members that are no model (they critique every annotation)
        self._backends: dict[str, Backend] = {}
        for m in config.ensemble.members:  # every member's file found before any engine starts (seconds each)
            if m.kind != "verifier":
                check_model(m.engine(config.annotator), f"ensemble member {m.display_name}")
        try:
            for m in config.ensemble.members:
                if m.kind == "verifier":
                    self.verifiers.append(GroundingVerifier(m.display_name))
                    continue
                self.members.append(self._load(m, config))
            self._check_critics()
        except BaseException:
            self.close()
            raise

    def _load(self, m: MemberConfig, config: RatchetConfig) -> Member:
        engine = m.engine(config.annotator)
        key = _engine_key(engine)
        if key not in self._backends:
            try:
                self._backends[key] = make_backend(engine)
            except ModelNotFound as exc:
                raise ModelNotFound(f"ensemble member {m.display_name}: {exc}") from None
        return Member(m.display_name, m.persona, list(m.roles), m.temperature, self._backends[key], m.few_shot,
                      m.best_of)

    def backend_for(self, engine) -> Backend | None:
        """The loaded backend of this engine config, if a member already uses it."""
        return self._backends.get(_engine_key(engine))

    def load(self, engine, stack, who: str) -> Backend:
        """A judge's, auditor's or panel member's engine: a member's loaded model when the
        engine config is the same, otherwise loaded here and closed when `stack` closes. A
        missing model file is named with `who` (e.g. the config key)."""
        backend = self.backend_for(engine)
        if backend is None:
            try:
                backend = stack.enter_context(make_backend(engine))
            except ModelNotFound as exc:
                raise ModelNotFound(f"{who}: {exc}") from None
        return backend

    @property
    def annotators(self) -> list[Member]:
        return [m for m in self.members if "annotate" in m.roles]

    @property
    def critics(self) -> list[Member]:
        return [m for m in self.members if "critique" in m.roles]

    @property
    def families(self) -> list[str]:
        return sorted({m.family for m in [*self.members, *self.verifiers]})

    def eligible_critics(self, author: Member) -> list[Member]:
        return [c for c in self.critics if c.name != author.name and c.differs_from(author)]

    def _check_critics(self) -> None:
        for author in self.annotators:
            eligible = self.eligible_critics(author)
            if self.k > len(eligible):
                raise EnsembleError(
                    f"ensemble.k = {self.k} but only {len(eligible)} critic(s) differ from {author.name} "
                    f"(family {author.family}, persona {author.persona}) in family or persona: "
                    "lower k or add critics of another family or persona")

    def critics_for(self, author: Member, passage_id: str, silent: frozenset[str] = frozenset()) -> list[Member]:
        """k critics for one annotation: other families first, then the author's family under
        another persona; within each tier a hash of (passage, critic) spreads the work. `silent`
        critics (vote weight 0: measured at chance) are not asked; fewer than k may remain."""
        def order(c: Member) -> tuple:
            spread = hashlib.sha256(f"{passage_id}\x1f{c.name}".encode()).hexdigest()
            return (c.family == author.family, spread)

        return sorted((c for c in self.eligible_critics(author) if c.name not in silent), key=order)[: self.k]

    def warnings(self) -> list[str]:
        out = []
        if len(self.families) == 1:
            out.append(f"every member is of one model family ({self.families[0]}): critics share the author's "
                       "substrate, so convergence is weaker; add a member of another family")
        if self.k == 0 and not self.verifiers:
            out.append("ensemble.k = 0: annotations are not scrutinized; every valid one counts as converged")
        elif self.k == 0:
            out.append("ensemble.k = 0: only the grounding verifier scrutinizes annotations (no model critic)")
        return out

    def describe(self) -> dict:
        out = {m.name: {"persona": m.persona, "roles": m.roles, "family": m.family, **m.backend.describe()}
               for m in self.members}
        return out | {v.name: v.describe() for v in self.verifiers}

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
