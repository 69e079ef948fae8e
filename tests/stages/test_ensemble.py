"""The default two-family ensemble on the real bundled models: SmolLM2 (llama family, chat
template, grammar-constrained) and Gemma 3 270M (a base model: plain prompt, free decoding
validated against the schema). Two passages keep it short."""
from unittest import mock

import datasets
import pytest
from typer.testing import CliRunner

from builder.build import run_build
from builder.cache import CachedBackend
from builder.cli import app
from builder.compile import split_path
from builder.prompts import Prompts
from builder.workspace import Workspace

from ..conftest import SHORT_PASSAGES, median_confidence, write_workspace

pytestmark = pytest.mark.slow
# Two families that both annotate and critique (the default ensemble before Qwen became its writer), and the verifier.
DEFAULT_ENSEMBLE = {"k": 2, "members": [{"persona": "empiricist"}, {"model": "bundled:gemma3", "persona": "skeptic"},
                                        {"persona": "care-ethicist", "roles": ["critique"]},
                                        {"kind": "verifier", "name": "grounding"}]}


@pytest.fixture(scope="module")
def ensemble_build(tmp_path_factory):
    root = write_workspace(tmp_path_factory.mktemp("ensemble") / "ws", SHORT_PASSAGES[:2],
                           sampling={"max_tokens": 384}, ensemble=DEFAULT_ENSEMBLE)
    prompts = []
    original = CachedBackend.generate

    def recording(self, requests, on_response=None):
        prompts.extend((self.backend.family, self.backend.render(r.messages)) for r in requests)
        return original(self, requests, on_response)

    ws = Workspace(root)
    with mock.patch.object(CachedBackend, "generate", recording):
        summary = run_build(ws)
    return ws, summary, prompts


def query(ws, sql, *args):
    con = ws.connect(read_only=True)
    try:
        return con.execute(sql, list(args)).fetchall()
    finally:
        con.close()


def test_two_families_annotate_and_the_summary_shows_the_ensemble(ensemble_build):
    ws, s, _ = ensemble_build
    e = s["ensemble"]
    assert e["families"] == ["gemma3", "llama", "verifier"] and e["k"] == 2
    assert set(e["members"]) == {"smollm2-empiricist", "gemma3-skeptic", "smollm2-care-ethicist", "grounding"}
    assert s["annotations"] == 4  # two passages x two annotating members
    annotators = {r[0] for r in query(ws, "SELECT DISTINCT annotator FROM annotations")}
    assert annotators == {"smollm2-empiricist", "gemma3-skeptic"}
    families = dict(query(ws, "SELECT name, family FROM members"))
    assert families["gemma3-skeptic"] == "gemma3" and families["smollm2-care-ethicist"] == "llama"
    assert families["grounding"] == "verifier"
    # k = 2 model critics per accepted annotation, and the grounding verifier on every one
    assert e["critiques"] + e["invalid_critiques"] == 3 * s["accepted"]


def test_critics_differ_from_the_author_and_the_other_family_critiques_first(ensemble_build):
    ws, _, _ = ensemble_build
    rows = query(ws, """SELECT c.passage_id, c.annotator, c.critic, ma.family, mc.family, ma.persona, mc.persona
                        FROM critiques c JOIN members ma ON ma.name = c.annotator JOIN members mc ON mc.name = c.critic""")
    assert rows
    per_annotation, verified = {}, {}
    for pid, author, critic, fa, fc, pa, pc in rows:
        assert critic != author and (fa != fc or pa != pc)
        if fc == "verifier":
            verified[(pid, author)] = verified.get((pid, author), 0) + 1
            continue
        per_annotation.setdefault((pid, author), []).append(fc != fa)
    for other_family in per_annotation.values():
        assert len(other_family) == 2 and any(other_family)  # one of the two critics is of another family
    assert set(verified) == set(per_annotation) and set(verified.values()) == {1}  # the verifier checks each once


def test_critics_never_see_who_wrote_the_annotation(ensemble_build):
    ws, _, prompts = ensemble_build
    critic_prompts = [p for _, p in prompts if "Another reader wrote an epistemic annotation" in p]
    assert len(critic_prompts) >= 4
    authors = ["smollm2-empiricist", "gemma3-skeptic", "empiricist", "skeptic", "smollm2", "gemma"]
    own_persona = Prompts().persona("skeptic")
    for p in critic_prompts:
        user_turn = p.rsplit("<<<PASSAGE", 1)[1]  # the annotation under review and its passage
        assert not any(a in user_turn.lower() for a in authors)
        assert Prompts().audit_notice in p  # critics are told they may be audited, like annotators
    # the gemma critic's system prompt carries its own persona, and no other member's
    gemma = [p for f, p in prompts if f == "gemma3" and "Another reader wrote" in p]
    assert gemma and all(own_persona in p and Prompts().persona("care-ethicist") not in p for p in gemma)


def test_annotations_split_carries_scores_and_verdicts_and_sft_keeps_the_selected(ensemble_build):
    ws, s, _ = ensemble_build
    gen = ws.generation_dir(1)
    ann = datasets.load_dataset("parquet", data_files=str(split_path(gen, "annotations")), split="train")
    assert {"convergence", "selected", "critiques"} <= set(ann.column_names)
    scores = dict(((r[0], r[1]), r[2]) for r in query(ws, "SELECT passage_id, annotator, score FROM convergence"))
    for row in ann:
        if row["status"] == "accepted":
            assert row["convergence"] == scores[(row["passage_id"], row["annotator"])]
            verdicts = [c["verdict"] for c in row["critiques"]]
            assert all(v in ("survives", "revise", "reject") for v in verdicts)
            if row["convergence"] is not None:  # the weighted mean of P(survives) + 0.5 P(revise)
                for c in row["critiques"]:
                    dist = c["calibrated"] or c["probs"]  # decide_by = calibrated, where a baseline was read
                    assert c["score"] == pytest.approx(dist["survives"] + 0.5 * dist["revise"], abs=1e-5)
                weighted = sum(c["weight"] * c["score"] for c in row["critiques"])
                assert row["convergence"] == pytest.approx(weighted / sum(c["weight"] for c in row["critiques"]))
        else:
            assert row["critiques"] == [] and not row["selected"]
    selected = query(ws, "SELECT passage_id, annotator, score, reason FROM selections")
    assert len(selected) == 2 and all(r[3] for r in selected)  # a reason for every passage, kept or not
    kept = [r for r in selected if r[1] is not None]
    assert all(r[2] >= 0.5 for r in kept) and sum(ann["selected"]) == len(kept) == s["ensemble"]["selected"]
    if kept:
        sft = datasets.load_dataset("parquet", data_files=str(split_path(gen, "sft")), split="train")
        assert sum(r["n_reflections"] for r in sft) == len(kept)


def test_agreement_is_stored_and_sql_shows_it_per_member(ensemble_build):
    ws, s, _ = ensemble_build
    rows = query(ws, "SELECT scope, member, alpha, units, critiques FROM agreement ORDER BY scope, member")
    scopes = {(r[0], r[1]) for r in rows}
    assert ("generation", "*") in scopes
    critics = {r[0] for r in query(ws, "SELECT DISTINCT critic FROM critiques")}
    assert critics and {m for sc, m in scopes if sc == "critic"} == critics
    authors = {r[0] for r in query(ws, "SELECT DISTINCT annotator FROM critiques")}
    assert {m for sc, m in scopes if sc == "author"} == authors
    assert all(r[2] is None or -1.0 <= r[2] <= 1.0 for r in rows)
    assert s["ensemble"]["agreement"]["generation"] == next(r[2] for r in rows if r[0] == "generation")
    result = CliRunner().invoke(app, ["sql", "-w", str(ws.root), "-f", "json", "SELECT * FROM agreement_by_member"])
    assert result.exit_code == 0 and "smollm2-care-ethicist" in result.output  # a critic in every annotation
    verdicts = CliRunner().invoke(app, ["sql", "-w", str(ws.root), "-f", "csv", "SELECT * FROM critic_verdicts_by_member"])
    assert verdicts.exit_code == 0 and "smollm2-care-ethicist" in verdicts.output


def test_card_describes_the_ensemble_and_rebuild_makes_no_model_call(ensemble_build):
    ws, s, _ = ensemble_build
    card = (ws.generation_dir(1) / "README.md").read_text()
    assert "## Ensemble and convergence" in card and "gemma3-skeptic" in card and "Krippendorff" in card
    again = run_build(ws)
    # every lookup is a hit now: the first build's calls and its own hits (the ratchet panel's
    # critiques that a scrutiny critic had already made)
    assert again["model_calls"] == 0 and again["cached_calls"] == s["model_calls"] + s["cached_calls"]
    assert again["ensemble"]["agreement"] == s["ensemble"]["agreement"]


def test_critics_too_unsure_to_vote_are_left_out_and_their_critiques_lead_the_page(ensemble_build, tmp_path):
    """Issues 30 (scope 5) and 31 (scope 4) on SmolLM2 and Gemma: a critique whose likeliest verdict
    is below judges.abstain_below is no vote, and the page offers it first. The threshold is not
    picked: it is the median confidence the model critics showed in this build, so that critiques
    fall on both sides whatever they were. The rebuild reads the first build's cached answers."""
    import json
    import shutil

    from builder.stages.audit import load_secret
    from builder.web.queue import load_critiques

    ws, _, _ = ensemble_build
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root)
    threshold = median_confidence(ws, "SELECT coalesce(calibrated, probs) FROM critiques WHERE status = 'accepted' "
                                      "AND method = 'logprobs'")
    write_workspace(root, None, sampling={"max_tokens": 384}, ensemble=DEFAULT_ENSEMBLE, judges={"abstain_below": threshold})
    copy = Workspace(root)
    summary = run_build(copy, overwrite=True)
    con = copy.connect(read_only=True)
    critiques = con.execute("SELECT passage_id, annotator, critic, method, abstain, coalesce(calibrated, probs) "
                            "FROM critiques WHERE status = 'accepted'").fetchall()
    votes = dict(((p, a), n) for p, a, n in con.execute("SELECT passage_id, annotator, critiques FROM convergence").fetchall())
    escalated = {(i, a, c) for i, a, c in con.execute("SELECT item, annotator, critic FROM escalations").fetchall()}
    queue = load_critiques(con, load_secret(root), 1, copy.config.audit.rate)
    con.close()
    assert summary["model_calls"] == 0  # the same answers, read with the threshold
    abstained = {(p, a, c) for p, a, c, _, abstain, _ in critiques if abstain}
    for p, a, c, method, abstain, probs in critiques:  # the grounding verifier is a rule: it never abstains
        assert abstain == (method == "logprobs" and max(json.loads(probs).values()) < threshold)
    assert abstained and len(abstained) < sum(m == "logprobs" for _, _, _, m, _, _ in critiques)
    assert all(n == sum((p, a) == k and not ab for p, a, _, _, ab, _ in critiques) for k, n in votes.items())
    assert escalated == abstained and summary["votes"]["abstained"] == len(abstained)
    assert {x.key for x in queue[:len(abstained)]} == abstained and all(x.needs_person for x in queue[:len(abstained)])


def test_a_member_whose_model_file_is_missing_is_named(tmp_path):
    root = write_workspace(tmp_path / "ws", ["A passage."], ensemble={
        "k": 1, "members": [{"persona": "empiricist"}, {"model": str(tmp_path / "gone.gguf"), "persona": "skeptic"}]})
    result = CliRunner().invoke(app, ["build", "-w", str(root)])
    assert result.exit_code == 1
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "ensemble member gone-skeptic" in output and "gone.gguf: model file not found" in output
