"""Reputation: a Beta record per member over the audits of its work up to each generation,
for annotators (audits, table `reputation`) and critics (critique audits, `critic_reputation`,
whose mean weighs their votes: stages/scrutinize.py: vote_weights). Only current verdicts count
(views audits_in_sample / critique_audits_in_sample: the text they judged is still there, and it was
chosen at random, not because a judge abstained on it). Below the audit stage and the vote weights,
which both read it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ..tables import Table, doc


@dataclass
class ReputationRow:
    annotator: str
    generation: int = doc("over every audit up to this generation")
    passes: Annotated[int, "BIGINT"]
    fails: Annotated[int, "BIGINT"]
    alpha: float
    beta: float
    mean: float = doc("the annotator's vote weight")
    pass_mass: float | None = doc("sum of P(pass) over the audits (passes counts the most likely verdicts)",
                                  default=None, added=True)


REPUTATION = Table("reputation", ReputationRow, key=("annotator", "generation"),
                   doc="Beta posterior of each annotator's audit pass rate")


# A Beta(1 + Σ P(good), 1 + Σ P(bad)) record per member over every current audit (its text
# unchanged since: a stale verdict judged text that is no longer there) up to generation $g by
# the auditor kinds in $kinds (an audit without a probability counts its verdict as 1 or 0).
BETA_RECORD_SQL = """
    SELECT {who}, $g::INTEGER AS generation,
           count(*) FILTER (verdict = '{good}') AS {goods}, count(*) FILTER (verdict <> '{good}') AS {bads},
           sum(coalesce({prob}, (verdict = '{good}')::DOUBLE)) AS {mass},
           1 + {mass} AS alpha, 1 + count(*) - {mass} AS beta, alpha / (alpha + beta) AS mean
    FROM {table} WHERE generation <= $g AND list_contains($kinds, auditor_kind) GROUP BY {who}"""
REPUTATION_SQL = BETA_RECORD_SQL.format(who="annotator", good="pass", goods="passes", bads="fails", prob="pass_prob",
                                        mass="pass_mass", table="audits_in_sample")
KINDS = ["model", "human"]


@dataclass(frozen=True)
class BetaRecord:
    """A stored Beta record (annotators' reputation, critics' record): one SQL, kept per generation."""
    table: str
    who: str
    sql: str

    def update(self, con, generation: int) -> dict[str, float]:
        """Every member's record over every audit up to this generation, stored. Returns name -> mean."""
        con.execute(f"DELETE FROM {self.table} WHERE generation = ?", [generation])
        con.execute(f"INSERT INTO {self.table} BY NAME " + self.sql, {"g": generation, "kinds": KINDS})
        return dict(con.execute(f"SELECT {self.who}, mean FROM {self.table} WHERE generation = ?", [generation]).fetchall())

    def means(self, con, generation: int, kinds: list[str]) -> dict[str, float]:
        """The same posterior from the audits of some auditor kinds only, without storing it."""
        return dict(con.execute(f"SELECT {self.who}, mean FROM ({self.sql})", {"g": generation, "kinds": kinds}).fetchall())

    def counts(self, con, generation: int, kinds: list[str]) -> dict[str, tuple[int, float]]:
        """name -> (audits, posterior mean) from the audits of some auditor kinds only."""
        rows = con.execute(f"SELECT {self.who}, alpha + beta - 2, mean FROM ({self.sql})",
                           {"g": generation, "kinds": kinds}).fetchall()
        return {who: (round(n), mean) for who, n, mean in rows}


ANNOTATOR_RECORD = BetaRecord("reputation", "annotator", REPUTATION_SQL)
update_reputation = ANNOTATOR_RECORD.update
reputation_means = ANNOTATOR_RECORD.means


def refresh_reputations(con, generation: int) -> None:
    """After verdicts for `generation` arrive late (an import, the audit page): every record from
    that generation on counts them, not only that generation's (a later generation's vote
    weights read the latest record)."""
    last = con.execute("SELECT max(generation) FROM annotations").fetchone()[0] or generation
    for g in range(generation, max(last, generation) + 1):
        update_reputation(con, g)
        update_critic_reputation(con, g)


@dataclass
class CriticReputationRow:
    critic: str
    generation: int = doc("over every critique audit up to this generation")
    rights: Annotated[int, "BIGINT"]
    wrongs: Annotated[int, "BIGINT"]
    right_mass: float = doc("sum of P(right) over the audits (rights counts the most likely verdicts)")
    alpha: float
    beta: float
    mean: float = doc("the member's vote weight as a critic in later generations")


CRITIC_REPUTATION = Table("critic_reputation", CriticReputationRow, key=("critic", "generation"),
                          doc="Beta posterior of each critic's audited rate of right verdicts: its vote weight")


# The same for critics: Beta(1 + Σ P(right), 1 + Σ P(wrong)) over every critique audit up to $g.
CRITIC_RECORD_SQL = BETA_RECORD_SQL.format(who="critic", good="right", goods="rights", bads="wrongs", prob="right_prob",
                                           mass="right_mass", table="critique_audits_in_sample")


# A critic's record (the mean weighs its votes in later generations: stages/scrutinize.py: vote_weights).
CRITIC_RECORD = BetaRecord("critic_reputation", "critic", CRITIC_RECORD_SQL)
update_critic_reputation = CRITIC_RECORD.update
critic_record_means = CRITIC_RECORD.means
critic_record_counts = CRITIC_RECORD.counts
