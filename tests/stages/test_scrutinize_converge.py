"""The ensemble's logic without models: critic choice, convergence scores, selection,
Krippendorff's alpha, config errors and a critic that answers garbage. The same stages run
on the real models in test_ensemble.py."""
import json

import duckdb
import pytest

import builder.ensemble as ensemble_module
from builder.backends.base import Response
from builder.cache import CachedBackend
from builder.config import ConfigError, RatchetConfig, load_config, parse_config
from builder.stages.converge import PRIOR_WEIGHT, Scored, agreement, alpha, convergence_score, score_annotations, select
from builder.ensemble import Ensemble, EnsembleError
from builder.prompts import Prompts
from builder.stages.scrutinize import CritiqueRow, Task, critique, critique_schema
from builder.workspace import create_schema

from ..conftest import TextBackend

RECORD = {"claims": [{"claim": "Taxes rose", "evidence": "taxes rose", "kind": "fact", "support": "weak",
                      "confidence": "low"},
                     {"claim": "Taxes are unfair", "evidence": "unfair taxes", "kind": "value", "support": "none",
                      "confidence": "low"}],
          "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [], "reflection": "An unsourced claim about taxes."}


class Fake(TextBackend):
    """A backend of a given family that answers from a list, one answer per call."""

    def __init__(self, family="llama", answers=()):
        self.family = family
        self.answers = list(answers)
        self.prompts = []

    model_id = property(lambda self: f"fake-{self.family}")

    def generate(self, requests, on_response=None):
        out = []
        for i, r in enumerate(requests):
            self.prompts.append(self.render(r.messages))
            text = self.answers.pop(0) if self.answers else "{}"
            out.append(Response(text, "stop", 10, 5))
            if on_response:
                on_response(i, out[-1])
        return out


def ensemble_of(monkeypatch, members, k, families=None):
    """An Ensemble whose engines are fakes; families maps a model spec to its family."""
    families = families or {"bundled:smollm2": "llama", "bundled:gemma3": "gemma3"}
    monkeypatch.setattr(ensemble_module, "make_backend", lambda cfg: Fake(families.get(cfg.model, "other")))
    return Ensemble(parse_config({"ensemble": {"k": k, "members": members}}))


DEFAULT = [{"model": "bundled:smollm2", "persona": "empiricist"}, {"model": "bundled:gemma3", "persona": "skeptic"},
           {"model": "bundled:smollm2", "persona": "care-ethicist", "roles": ["critique"]}]


def test_critics_differ_from_the_author_other_family_first(monkeypatch):
    ens = ensemble_of(monkeypatch, DEFAULT, k=2)
    by = {m.name: m for m in ens.members}
    assert ens.members[0].backend is ens.members[2].backend  # one loaded model, two personas
    for pid in ("a", "b", "c"):
        critics = ens.critics_for(by["smollm2-empiricist"], pid)
        assert [c.name for c in critics][0] == "gemma3-skeptic"  # the other family comes first
        assert {c.name for c in critics} == {"gemma3-skeptic", "smollm2-care-ethicist"}
        assert {c.family for c in ens.critics_for(by["gemma3-skeptic"], pid)} == {"llama"}
    assert "smollm2-care-ethicist" not in {m.name for m in ens.annotators}


def test_a_critic_identical_in_family_and_persona_is_never_chosen(monkeypatch):
    members = [{"name": "a", "model": "bundled:smollm2", "persona": "skeptic"},
               {"name": "b", "model": "bundled:smollm2", "persona": "skeptic", "temperature": 0.9}]
    with pytest.raises(EnsembleError, match="only 0 critic"):
        ensemble_of(monkeypatch, members, k=1)


def test_one_family_is_allowed_with_a_warning_and_k0_warns_too(monkeypatch):
    one = ensemble_of(monkeypatch, [{"model": "bundled:smollm2", "persona": "empiricist"},
                                    {"model": "bundled:smollm2", "persona": "skeptic"}], k=1)
    assert any("one model family" in w and "weaker" in w for w in one.warnings())
    assert not [w for w in ensemble_of(monkeypatch, DEFAULT, k=2).warnings() if "family" in w]
    assert any("not scrutinized" in w for w in ensemble_of(monkeypatch, DEFAULT, k=0).warnings())


def test_k_larger_than_the_ensemble_is_a_config_error_naming_the_key(tmp_path):
    (tmp_path / "ratchet.toml").write_text('[ensemble]\nk = 5\n')
    with pytest.raises(ConfigError, match=r"ratchet.toml.*\n.*ensemble.k = 5 but qwen2.5-coder-0.5b-empiricist has only 2 other critic"):
        load_config(tmp_path / "ratchet.toml")


@pytest.mark.parametrize("members, message", [
    ([{"model": "bundled:smollm2", "persona": "x"}, {"model": "bundled:smollm2", "persona": "x"}], "names must be unique"),
    ([{"persona": "x", "roles": ["critique"]}], "no member has the role 'annotate'"),
    ([{"persona": "x", "role": ["annotate"]}], "unknown key 'ensemble.members.0.role' (did you mean 'roles'?)"),
    ([{"persona": "x", "roles": ["judge"]}], "ensemble.members.0.roles.0"),
])
def test_bad_member_lists_are_config_errors(members, message):
    with pytest.raises(ConfigError) as exc:
        parse_config({"ensemble": {"k": 0, "members": members}}, "ws/ratchet.toml")
    assert message in str(exc.value) and "ws/ratchet.toml" in str(exc.value)


def test_members_inherit_the_annotator_engine():
    cfg = parse_config({"annotator": {"backend": "openai", "base_url": "http://127.0.0.1:9", "model": "served"},
                        "ensemble": {"k": 0, "members": [{"persona": "skeptic"}]}})
    member = cfg.ensemble.members[0]
    assert member.display_name == "served-skeptic"
    engine = member.engine(cfg.annotator)
    assert (engine.backend, engine.base_url, engine.model) == ("openai", "http://127.0.0.1:9", "served")


def test_default_ensemble_is_a_qwen_writer_two_critics_of_other_families_and_the_verifier():
    cfg = RatchetConfig()
    models = {m.model: m for m in cfg.ensemble.members if m.kind == "model"}
    assert set(models) == {"bundled:qwen2.5-coder-0.5b", "bundled:gemma3", "bundled:smollm2"}  # smollm2: annotator.model
    writer = models["bundled:qwen2.5-coder-0.5b"]
    assert writer.roles == ["annotate"] and writer.few_shot is False
    assert all(m.roles == ["critique"] for m in cfg.ensemble.members if m is not writer)
    assert [m.display_name for m in cfg.ensemble.members if m.kind == "verifier"] == ["grounding"]
    assert cfg.ensemble.k == 2


def test_convergence_score_is_the_weighted_mean_of_the_critics_scores():
    votes = [("a", 1.0), ("b", 0.0), ("c", 0.5)]  # P(survives) + 0.5 P(revise) of each critic
    assert convergence_score(votes, {}) == pytest.approx(0.5)  # equal prior weights
    assert convergence_score(votes, {"a": 0.9, "b": 0.1, "c": 0.5}) == pytest.approx((0.9 + 0.25) / 1.5)
    assert convergence_score([], {}) is None
    assert PRIOR_WEIGHT == 0.5


def crit(pid, author, critic, verdict, status="accepted", abstain=False):
    return CritiqueRow(1, pid, author, critic, status, verdict, None, None, PRIOR_WEIGHT, None, 1, None,
                       abstain=abstain)


def test_selection_keeps_the_best_above_threshold_or_says_why_not():
    critiques = [crit("p1", "x", "c1", "survives"), crit("p1", "x", "c2", "survives"),
                 crit("p1", "y", "c1", "survives"), crit("p1", "y", "c2", "reject"),
                 crit("p2", "x", "c1", "reject"), crit("p2", "x", "c2", "revise"),
                 crit("p3", "x", "c1", None, status="rejected")]
    scored = score_annotations([("p1", "x"), ("p1", "y"), ("p2", "x"), ("p3", "x")], critiques, {})
    assert [s.score for s in scored] == [1.0, 0.5, 0.25, None]  # a verdict without a distribution: 1, 0.5 or 0
    chosen = {s.passage_id: s for s in select(["p1", "p2", "p3", "p4"], scored, 0.5, True, ["x", "y"])}
    assert (chosen["p1"].annotator, chosen["p1"].reason) == ("x", "converged")
    assert chosen["p2"].annotator is None and chosen["p2"].reason.startswith("below threshold: best score 0.25 (x) < 0.50")
    assert (chosen["p3"].annotator, chosen["p3"].reason) == (None, "no valid critique")  # a garbage critic does not vote
    assert (chosen["p4"].annotator, chosen["p4"].reason) == (None, "no valid annotation")


def test_ties_go_to_more_critiques_then_a_stable_order_that_is_not_the_config_order():
    from builder.stages.converge import tie_break

    scored = [Scored("p", "y", 1.0, 2), Scored("p", "x", 1.0, 1), Scored("p", "z", 1.0, 2)]
    expected = min(["y", "z"], key=lambda a: tie_break("p", a))  # x has fewer critiques
    assert select(["p"], scored, 0.5, True, ["x", "y", "z"])[0].annotator == expected
    assert select(["p"], scored, 0.5, True, ["z", "y", "x"])[0].annotator == expected  # the config order plays no part
    # unscrutinized: every annotation ties; over many passages the member added last wins about half
    picks = [select([f"p{i}"], [Scored(f"p{i}", "base", None, 0), Scored(f"p{i}", "trained", None, 0)], 0.5, False,
                    ["base", "trained"])[0].annotator for i in range(200)]
    assert 70 < picks.count("trained") < 130


def test_krippendorff_alpha_matches_a_hand_computation():
    # two critics, four annotations: they agree on three (nominal). Hand computation:
    # pairable values 8; coincidences o_ss=2+2+2 (agreements counted twice) ... alpha = 1 - D_o/D_e.
    verdicts = [("u1", "survives", "survives"), ("u2", "reject", "reject"), ("u3", "revise", "revise"),
                ("u4", "survives", "reject")]
    critiques = [crit(u, "x", "c1", a) for u, a, _ in verdicts] + [crit(u, "x", "c2", b) for u, _, b in verdicts]
    n = 8
    counts = {"survives": 3, "reject": 3, "revise": 2}
    d_o = 2 / n  # one disagreeing unit contributes two ordered pairs over m-1 = 1
    d_e = (n * n - sum(c * c for c in counts.values())) / (n * (n - 1))
    assert alpha(critiques) == pytest.approx(round(1 - d_o / d_e, 4))
    assert alpha([crit("u1", "x", "c1", "survives"), crit("u1", "x", "c2", "survives")]) is None  # no variation
    assert alpha([crit("u1", "x", "c1", "survives")]) is None  # one critic


def test_an_abstained_critique_is_no_vote_in_the_agreement():
    """Alpha and its counts are over votes, as the score is: a critic too unsure to vote is
    not a disagreement (nor an agreement) it never cast."""
    votes = [crit("u1", "x", "c1", "survives"), crit("u1", "x", "c2", "survives"),
             crit("u2", "x", "c1", "reject"), crit("u2", "x", "c2", "revise"),
             crit("u3", "x", "c1", "revise"), crit("u3", "x", "c2", "revise")]
    unsure = [crit("u1", "x", "c3", "reject", abstain=True), crit("u4", "x", "c1", "reject", abstain=True),
              crit("u4", "x", "c2", "survives")]
    assert alpha(votes) is not None
    assert alpha(votes + unsure) == alpha(votes)
    assert alpha(votes + [crit("u1", "x", "c3", "reject")]) != alpha(votes)  # the same critique, voting, counts
    [whole, *_] = agreement(votes + unsure)
    assert (whole.units, whole.critiques) == (3, 7)  # u4 has one vote; the two abstentions are not counted


def test_critic_that_returns_garbage_is_retried_then_recorded_and_never_sees_the_author(monkeypatch):
    con = duckdb.connect()
    create_schema(con)
    valid = json.dumps({"claim_verdicts": ["sound", "doubtful"], "objections": [], "verdict": "revise"})
    # rounds: task 1 answers bad, bad, good; task 2 answers garbage every time
    backend = Fake("gemma3", answers=["not json {", "{{{", '{"verdict": "survives"}', "[]", valid, "nope"])
    cfg = parse_config({"annotate": {"retries": 2}, "ensemble": {"k": 0, "members": [{"persona": "skeptic"}]}})
    critic = ensemble_module.Member("gemma3-skeptic", "skeptic", ["critique"], None, backend)
    tasks = [Task("p1", "Taxes rose last year.", "secret-author-name", RECORD),
             Task("p2", "The mayor lied.", "secret-author-name", RECORD)]
    results = critique(tasks, critic, CachedBackend(backend, con), Prompts(), cfg)
    first, second = results
    assert (first.status, first.verdict, first.attempts, first.claim_verdicts) == ("accepted", "revise", 3, ["sound", "doubtful"])
    assert second.status == "rejected" and second.verdict is None and second.attempts == 3
    assert second.reason.startswith(("invalid JSON", "schema violation"))
    assert not any("secret-author-name" in p for p in backend.prompts)
    assert all(Prompts().audit_notice in p for p in backend.prompts)


def test_critique_schema_asks_one_verdict_per_claim():
    schema = critique_schema(3)
    assert schema["properties"]["claim_verdicts"]["minItems"] == schema["properties"]["claim_verdicts"]["maxItems"] == 3
    assert list(schema["properties"])[-1] == "verdict"  # the verdict comes after what it rests on


def test_missing_persona_file_is_a_clear_error(tmp_path):
    from builder.prompts import PromptError

    with pytest.raises(PromptError, match=r"persona 'stoic': no file personas/stoic.txt .*known: .*empiricist"):
        Prompts().annotation_messages("text", persona="stoic")
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "stoic.txt").write_text("You read as a Stoic.")
    assert "You read as a Stoic." in Prompts(tmp_path).annotation_messages("text", persona="stoic")[0]["content"]


def test_a_rebuild_forgets_annotations_of_members_no_longer_in_the_ensemble(monkeypatch):
    from builder.stages.annotate import store_members

    con = duckdb.connect()
    create_schema(con)
    for annotator in ("smollm2-empiricist", "renamed-away"):
        con.execute("INSERT INTO annotations (generation, passage_id, annotator, status, attempts, truncated, record) "
                    "VALUES (1, 'p', ?, 'accepted', 1, 0, '{}')", [annotator])
    con.execute("INSERT INTO annotations (generation, passage_id, annotator, status, attempts, truncated, record) "
                "VALUES (2, 'p', 'renamed-away', 'accepted', 1, 0, '{}')")
    store_members(con, 1, ensemble_of(monkeypatch, DEFAULT, k=2))
    kept = con.execute("SELECT generation, annotator FROM annotations ORDER BY ALL").fetchall()
    assert kept == [(1, "smollm2-empiricist"), (2, "renamed-away")]  # other generations are left alone
    assert {r[0] for r in con.execute("SELECT name FROM members").fetchall()} == {
        "smollm2-empiricist", "gemma3-skeptic", "smollm2-care-ethicist"}
