"""Blindness: the secret and the sample never reach a prompt, a log line, an error, a published
file or the card, and the prompts do not depend on the sample. What goes where is orchestration,
so the builds run on the scripted engine (the real model auditor runs in test_build.py's
real build)."""
import csv
import json
import os
from unittest import mock

import pytest
from typer.testing import CliRunner

from builder.stages.audit import SECRET_ENV, is_critique_selected, is_selected
from builder.build import run_build
from builder.cache import CachedBackend
from builder.cli import app
from builder.corpus import passage_id
from builder.prompts import Prompts
from builder.workspace import Workspace

from ..conftest import SHORT_PASSAGES, write_workspace

RATE = 0.5
IDS = [passage_id(t) for t in SHORT_PASSAGES]


def chosen(secret: str) -> set[str]:
    return {i for i in IDS if is_selected(secret.encode(), i, "smollm2", 1, RATE)}


def pick_secrets() -> tuple[str, str]:
    """Two secrets whose samples differ and are not empty."""
    candidates = [f"audit-secret-{n:03d}-" + "9f3c" * 6 for n in range(200)]
    a = next(s for s in candidates if chosen(s))
    b = next(s for s in candidates if chosen(s) and chosen(s) != chosen(a))
    return a, b


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    # One annotator (named smollm2, as the sample below expects) and a critic that is not it.
    ensemble = {"k": 1, "members": [{"name": "smollm2", "persona": "empiricist"},
                                    {"name": "critic", "persona": "skeptic", "roles": ["critique"]}]}
    root = write_workspace(tmp_path_factory.mktemp("blind") / "ws", SHORT_PASSAGES, sampling={"max_tokens": 384},
                           audit={"rate": RATE, "auditor": "bundled:smollm2"}, annotator={"backend": "scripted", "model": "bundled:smollm2"},
                           ensemble=ensemble)
    secret_a, secret_b = pick_secrets()
    prompts: dict[str, list[str]] = {"a": [], "b": []}
    original = CachedBackend.generate
    current = []

    def recording(self, requests, on_response=None):
        current.extend(self.backend.render(r.messages) for r in requests)
        return original(self, requests, on_response)

    ws = Workspace(root)
    gen = ws.generation_dir(1)
    with mock.patch.object(CachedBackend, "generate", recording):
        current = prompts["a"]
        with mock.patch.dict(os.environ, {SECRET_ENV: secret_a}):
            summary_a = run_build(ws)
        published_a = {p.relative_to(gen): p.read_bytes() for p in gen.rglob("*") if p.is_file()}
        current = prompts["b"]
        with mock.patch.dict(os.environ, {SECRET_ENV: secret_b}):
            # another secret, another audit sample, other audit aggregates: the compiled
            # generation may only be replaced on purpose
            result = CliRunner().invoke(app, ["build", "--workspace", str(root), "--overwrite"])
        assert result.exit_code == 0, result.output
    published_b = {p.relative_to(gen): p.read_bytes() for p in gen.rglob("*") if p.is_file()}
    return dict(ws=ws, secrets=(secret_a, secret_b), prompts=prompts, summary_a=summary_a, cli_output=result.output,
                published=(published_a, published_b))


def annotation_prompts(prompts):
    """The annotators' prompts (the ratchet panel's critic prompts carry the notice too)."""
    notice = Prompts().audit_notice
    return [p for p in prompts if notice in p and "You are a critic." not in p]


def test_critic_prompts_carry_the_same_notice_once(two_builds):
    notice = Prompts().audit_notice
    critic = [p for p in two_builds["prompts"]["a"] if "You are a critic." in p]
    assert critic and all(p.count(notice) == 1 for p in critic)
    assert len({p.split(notice)[0] for p in critic}) == 1


def test_every_annotator_prompt_carries_the_same_notice_once(two_builds):
    notice = Prompts().audit_notice
    annotate = annotation_prompts(two_builds["prompts"]["a"])
    assert len(annotate) >= len(SHORT_PASSAGES)
    assert all(p.count(notice) == 1 for p in annotate)
    system = {p.split(notice)[0] for p in annotate}
    assert len(system) == 1  # word for word the same instructions, audited item or not


def test_prompts_do_not_depend_on_the_sample(two_builds):
    a, b = (annotation_prompts(two_builds["prompts"][k]) for k in "ab")
    assert chosen(two_builds["secrets"][0]) != chosen(two_builds["secrets"][1])
    assert a == b  # other sample, same prompts in the same order
    con = two_builds["ws"].connect(read_only=True)
    calls = con.execute("SELECT count(*) FROM model_calls").fetchone()[0]
    con.close()
    # the second build made no new annotation call: only audits of newly sampled items and critiques
    newly = chosen(two_builds["secrets"][1]) - chosen(two_builds["secrets"][0])
    newly_critiques = critiques_chosen(two_builds, 1) - critiques_chosen(two_builds, 0)
    assert calls == (two_builds["summary_a"]["model_calls"] + len(newly & accepted_ids(two_builds["ws"]))
                     + len(newly_critiques))


def critiques_chosen(two_builds, which: int) -> set[tuple]:
    con = two_builds["ws"].connect(read_only=True)
    keys = con.execute("SELECT passage_id, annotator, critic FROM critiques WHERE status = 'accepted'").fetchall()
    con.close()
    secret = two_builds["secrets"][which].encode()
    return {k for k in keys if is_critique_selected(secret, *k, 1, RATE)}


def test_critiques_are_audited_blind(two_builds):
    """A secret sample of critiques is audited too (#15.12), and the auditor never learns who
    wrote the critique or the annotation."""
    ws = two_builds["ws"]
    con = ws.connect(read_only=True)
    audited = set(con.execute("SELECT item, annotator, critic FROM critique_audits WHERE auditor_kind = 'model'").fetchall())
    weights = dict(con.execute("SELECT critic, mean FROM critic_reputation WHERE generation = 1").fetchall())
    con.close()
    assert audited and audited <= critiques_chosen(two_builds, 0) | critiques_chosen(two_builds, 1)
    assert set(weights) == {c for _, _, c in audited}
    # By default measured validity and people's critique verdicts weigh votes: the model auditor's are a record, not a weight.
    summary = two_builds["summary_a"]["audit"]
    assert summary["vote_weights_from"] == "validity" and summary["vote_weight"] == {}
    assert summary["critiques"]["record"]
    auditing = [p for k in "ab" for p in two_builds["prompts"][k] if "A critic checked an annotation" in p]
    assert len(auditing) >= len(audited)
    for prompt in auditing:
        assert "Critique's verdict:" in prompt
        assert "critic" not in prompt.split("Critique:")[1].lower()  # the critic's name is "critic"
        assert "smollm2" not in prompt


def accepted_ids(ws):
    con = ws.connect(read_only=True)
    ids = {r[0] for r in con.execute("SELECT passage_id FROM annotations WHERE status = 'accepted'").fetchall()}
    con.close()
    return ids


def test_secret_appears_nowhere(two_builds):
    ws = two_builds["ws"]
    places = {"prompt": "\n".join(two_builds["prompts"]["a"] + two_builds["prompts"]["b"]).encode(),
              "cli output": two_builds["cli_output"].encode(),
              "database": ws.db_path.read_bytes()}
    for path in list(ws.logs_dir.rglob("*")) + list(ws.generations_dir.rglob("*")):
        if path.is_file():
            places[str(path)] = path.read_bytes()
    for secret in two_builds["secrets"]:
        for where, data in places.items():
            assert secret.encode() not in data, f"secret found in {where}"


def test_published_files_carry_no_per_item_audit_marker(two_builds):
    published_a, published_b = two_builds["published"]
    # The audit_summary split holds the audit's aggregates (pass rates per annotator), which do
    # depend on the sample; every other split must be byte-identical under another secret.
    data_a = {k: v for k, v in published_a.items() if k.parts[0] == "data" and not k.name.startswith("audit_summary")}
    data_b = {k: v for k, v in published_b.items() if k.parts[0] == "data" and not k.name.startswith("audit_summary")}
    assert data_a == data_b and data_b  # other sample, byte-identical splits: nothing in them depends on it
    import pyarrow.parquet as pq

    gen = two_builds["ws"].generation_dir(1)
    for name in data_b:
        assert not [c for c in pq.read_schema(gen / name).names if "audit" in c]
    sampled = chosen(two_builds["secrets"][0]) | chosen(two_builds["secrets"][1])
    texts = [published_b[k].decode() for k in published_b if k.suffix in (".md", ".json")]
    texts += [p.read_text() for p in two_builds["ws"].logs_dir.glob("*.log")]
    for item in sampled:
        assert not any(item in t for t in texts)  # the card, manifest and logs name no item


def test_model_auditor_audits_the_sample_into_duckdb(two_builds):
    ws = two_builds["ws"]
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT item, auditor_kind, verdict FROM audits").fetchall()
    expected = (chosen(two_builds["secrets"][0]) | chosen(two_builds["secrets"][1])) & accepted_ids(ws)
    assert {r[0] for r in rows} <= expected and rows
    assert {r[1] for r in rows} == {"model"} and {r[2] for r in rows} <= {"pass", "fail"}
    assert con.execute("SELECT count(*) FROM reputation WHERE annotator = 'smollm2'").fetchone()[0] >= 1
    con.close()
    assert "audit pass rate" in two_builds["cli_output"]


def test_export_review_import_round_trip(two_builds, tmp_path):
    ws = two_builds["ws"]
    runner = CliRunner()
    out = tmp_path / "review.csv"
    with mock.patch.dict(os.environ, {SECRET_ENV: two_builds["secrets"][1]}):
        result = runner.invoke(app, ["audit", "export", str(out), "--workspace", str(ws.root)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert {r["item"] for r in rows} == chosen(two_builds["secrets"][1]) & accepted_ids(ws)
    for i, row in enumerate(rows):
        row["verdict"] = "fail" if i == 0 else "pass"
        row["reasons"] = "claim 1 is not in the passage" if i == 0 else "faithful"
        row["wrong_claims"] = "1" if i == 0 else ""
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        fh.write("nope,smollm2,1,,,,pass,,\n")
    claims = tmp_path / "people.jsonl"
    none_yet = runner.invoke(app, ["audit", "claims", str(claims), "--workspace", str(ws.root)])
    assert none_yet.exit_code == 1 and "no claim judged by a person yet" in none_yet.output and not claims.exists()
    result = runner.invoke(app, ["audit", "import", str(out), "--auditor", "ana", "--workspace", str(ws.root)])
    assert result.exit_code == 1  # one bad row: reported, the rest kept
    assert f"imported {len(rows)} verdict(s) by ana" in result.output
    assert f"(row {len(rows) + 1}): no accepted annotation nope" in " ".join(result.output.split())
    sql = runner.invoke(app, ["sql", "-w", str(ws.root), "-f", "json", "SELECT * FROM audit_model_vs_human"])
    stats = json.loads(sql.output)
    con = ws.connect(read_only=True)
    model_audited = {r[0] for r in con.execute("SELECT item FROM audits WHERE auditor_kind = 'model'").fetchall()}
    human = con.execute("SELECT item, verdict, auditor FROM audits WHERE auditor_kind = 'human'").fetchall()
    con.close()
    assert {(h[0], h[2]) for h in human} == {(r["item"], "ana") for r in rows}
    both = {r["item"] for r in rows} & model_audited  # a model audit with no valid verdict is not stored
    assert (stats[0]["both_audited"] if stats else 0) == len(both)
    # #31.6: the person's verdicts, claim by claim, as the labelled file that weighs critics
    result = runner.invoke(app, ["audit", "claims", str(claims), "--workspace", str(ws.root)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    labelled = [json.loads(line) for line in claims.read_text().splitlines()]
    failed = rows[0]["item"]
    assert {(x["passage_id"], x["claim_number"]) for x in labelled if x["label"] == "unsupported"} == {(failed, 1)}
    assert {x["passage_id"] for x in labelled} == {r["item"] for r in rows} and all(x["auditor"] == "ana" for x in labelled)
    assert f"1 unsupported, {len(labelled) - 1} supported" in result.output
    from builder.measure import labelled_tasks

    tasks, labels = labelled_tasks(claims)  # what `ratchet validity --labelled` reads
    assert sorted(labels) == [0] * (len(labelled) - 1) + [1] and tasks[0].passage in SHORT_PASSAGES
    measured = runner.invoke(app, ["validity", "-w", str(ws.root), "--labelled", str(claims)], env={"COLUMNS": "200"})
    assert measured.exit_code == 0, measured.output
    con = ws.connect(read_only=True)
    assert con.execute("SELECT DISTINCT labelled FROM critic_validity").fetchall() == [("people.jsonl",)]
    con.close()
