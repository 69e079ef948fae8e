"""Graded judgements: a distribution over a judgement's allowed values, read from the engine's
token log-probabilities, calibrated against content-free inputs; the grounding verifier."""
import math

import duckdb
import pytest

from builder.backends.base import Request
from builder.backends.choices import Step, choice_logprobs, value_start
from builder.cache import CachedBackend
from builder.config import RatchetConfig
from builder.ensemble import Member
from builder.prompts import Prompts
from builder.resources import load_schema
from builder.stages.base import calibrate, run_task
from builder.stages.conscience import JudgeTask, load_framework
from builder.stages.scrutinize import CritiqueTask, Task, critic_sampling, critique_schema
from builder.verifier import check, grounding
from builder.workspace import create_schema

from ..conftest import SHORT_PASSAGES, engine_config

VERDICTS = ("survives", "revise", "reject")
RECORD = {"claims": [{"claim": "The bridge cut commuting times by 40 percent", "evidence": "cut commuting times by 40 percent",
                      "kind": "fact", "support": "weak", "confidence": "medium"}],
          "weak_reasoning": ["no data is published"], "uncertainties": [], "ethical_stakes": [],
          "reflection": "A claim without published data: weak support."}


# ------------------------------------------------------------------ reading a distribution from tokens


def steps(*tokens):
    """Steps from (text, {alternative text: probability}) pairs; ids are made up."""
    ids = {}
    out = []
    for text, top in tokens:
        alternatives = {ids.setdefault(t, len(ids)): (t, math.log(p)) for t, p in top.items()}
        out.append(Step(ids.setdefault(text, len(ids)), text, alternatives))
    return out


def test_the_distribution_is_read_where_the_value_begins_and_shared_prefixes_are_followed():
    text = '{"verdict": "reject"}'
    s = steps(('{"verdict": "', {'{"verdict": "': 1.0}), ("re", {"re": 0.5, "surv": 0.3, "rev": 0.1, "not": 0.1}),
              ("ject", {"ject": 0.8, "vise": 0.2}), ('"}', {'"}': 1.0}))
    assert value_start(text, "verdict") == len('{"verdict": "')
    got = {k: math.exp(v) for k, v in choice_logprobs(text, s, "verdict", VERDICTS).items()}
    # "not" begins no value: it is left out and the rest normalised over 0.9
    assert got == pytest.approx({"survives": 0.3 / 0.9, "revise": (0.1 + 0.5 * 0.2) / 0.9, "reject": 0.5 * 0.8 / 0.9})
    assert sum(got.values()) == pytest.approx(1.0)


def test_an_ambiguous_token_off_the_generated_path_is_probed():
    text = '{"verdict": "survives"}'
    s = steps(('{"verdict": "', {'{"verdict": "': 1.0}), ("surv", {"surv": 0.6, "re": 0.4}), ("ives", {"ives": 1.0}),
              ('"}', {'"}': 1.0}))
    probes = []

    def probe(path):
        probes.append(path)
        return {100: ("vise", math.log(0.25)), 101: ("ject", math.log(0.75))}

    got = {k: math.exp(v) for k, v in choice_logprobs(text, s, "verdict", VERDICTS, probe).items()}
    assert got == pytest.approx({"survives": 0.6, "revise": 0.1, "reject": 0.3}) and len(probes) == 1


def test_no_distribution_without_the_decision_or_with_tokens_that_do_not_spell_the_output():
    s = steps(("hello", {"hello": 1.0}))
    assert choice_logprobs("hello", s, "verdict", VERDICTS) is None
    assert choice_logprobs('{"verdict": "reject"}', s, "verdict", VERDICTS) is None


def test_calibration_divides_by_the_content_free_baseline():
    assert calibrate({"A": 0.6, "B": 0.4}, {"A": 0.75, "B": 0.25}) == pytest.approx({"A": 1 / 3, "B": 2 / 3})
    assert calibrate({"A": 0.6, "B": 0.4}, None) is None


# ------------------------------------------------------------------ the grounding verifier


def test_grounding_normalises_marks_case_whitespace_and_punctuation():
    passage = "The city council says the new bridge cut commuting times by 40 percent, but it has published no data."
    assert grounding("cut commuting times by 40 percent but", passage) == 1.0
    assert grounding("| The City Council  says", passage) == 1.0  # a copied data mark, case and spacing
    assert grounding("cut commuting times by 14 percent", passage) == 0.0  # a changed number is not the passage's
    assert grounding("", passage) == 0.0 and grounding("...", passage) == 0.0


def test_grounding_takes_one_contiguous_span_only():
    passage = SHORT_PASSAGES[0]
    assert grounding("the new bridge cut commuting times", passage) == 1.0
    assert grounding("the bridge cut commuting times", passage) == 0.0  # one word dropped: not the passage's words
    assert grounding("the new bridge ... published no data", passage) == 0.0  # pieces joined by an ellipsis
    assert grounding("council says the new bridge published no data", passage) == 0.0  # word pairs stitched


def test_the_verifier_votes_the_share_of_claims_whose_quote_is_a_span():
    passage = SHORT_PASSAGES[0]
    good = check(passage, RECORD)
    assert (good.verdict, good.share, good.claim_verdicts) == ("survives", 1.0, ["sound"])
    made_up = {**RECORD["claims"][0], "evidence": "reopened after four months"}
    close = {**RECORD["claims"][0], "evidence": "the council says the new bridge cut commuting times"}
    mixed = check(passage, {**RECORD, "claims": [RECORD["claims"][0], close, made_up]})
    assert mixed.claim_verdicts == ["sound", "wrong", "wrong"] and "not in the passage" in mixed.objections[1]
    assert mixed.share == pytest.approx(1 / 3, abs=1e-4) and mixed.verdict == "reject"
    assert mixed.probs == {"survives": mixed.share, "revise": 0.0, "reject": 1 - mixed.share}
    none = check(SHORT_PASSAGES[1], RECORD)  # another passage's reflection
    assert (none.verdict, none.share) == ("reject", 0.0)


# ------------------------------------------------------------------ on the real model


def real_engine(backend: str):
    from builder.backends import make_backend

    keys = {"slots": 1} if backend == "llama_server" else {}  # one sequence: the same numbers as in-process
    return make_backend(engine_config(backend=backend, model="bundled:smollm2", n_ctx=2048, **keys))


def consent_requests(prompts):
    """Greedy consent requests on a few reflections."""
    return [Request(prompts.consent_messages("PASSAGE", p, "REFLECTION", prompts.reflection(RECORD)),
                    load_schema("consent"), max_tokens=192, temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=7,
                    decision=("consent", ("yes", "no"))) for p in SHORT_PASSAGES[:3]]


def critic_requests(prompts):
    """Greedy critique requests: the passage's own reflection and another passage's."""
    return [Request(prompts.critique_messages(p, RECORD, persona="empiricist"), critique_schema(1), max_tokens=160,
                    temperature=0.0, top_p=1.0, repeat_penalty=1.0, seed=7, decision=("verdict", VERDICTS))
            for p in SHORT_PASSAGES[:3]]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama_cpp", "llama_server"])
def test_the_real_engine_gives_a_distribution_whose_argmax_is_the_greedy_choice(backend):
    import json

    with real_engine(backend) as engine:
        responses = engine.generate(critic_requests(Prompts()))
        consent = engine.generate(consent_requests(Prompts()))
    for r in responses:
        assert r.decision and r.decision["method"] == "logprobs" and r.decision["field"] == "verdict"
        probs = {k: math.exp(v) for k, v in r.decision["logprobs"].items()}
        assert set(probs) == set(VERDICTS) and sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 < max(probs.values()) < 1.0  # a distribution, not a label
        # Greedy decoding takes the most likely first token; a value whose first token others share
        # ("re" begins revise and reject) can be written while another value is the most likely
        # one, so for verdicts the written value only has to be possible.
        assert probs[json.loads(r.text)["verdict"]] > 0
    for r in consent:  # yes / no share no first token: greedy writes the most likely value
        probs = {k: math.exp(v) for k, v in r.decision["logprobs"].items()}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert max(probs, key=probs.get) == json.loads(r.text)["consent"]


@pytest.mark.slow
def test_the_server_and_in_process_read_the_same_distribution():
    out = {}
    for backend in ("llama_cpp", "llama_server"):
        with real_engine(backend) as engine:
            out[backend] = [r.decision["logprobs"] for r in engine.generate(critic_requests(Prompts())[:2])]
    for a, b in zip(out["llama_cpp"], out["llama_server"]):
        assert {k: math.exp(v) for k, v in a.items()} == pytest.approx({k: math.exp(v) for k, v in b.items()}, abs=2e-3)


@pytest.mark.slow
def test_judging_stages_store_raw_and_calibrated_distributions_on_the_real_model(smollm2):
    con = duckdb.connect()
    create_schema(con)
    engine = CachedBackend(smollm2, con)
    cfg = RatchetConfig()
    critic = Member("smollm2-empiricist", "empiricist", ["critique"], None, smollm2)
    task = CritiqueTask(Prompts(), critic_sampling(cfg, critic), 1, critic, judging=cfg.judgements)
    rows = run_task(task, [Task("p", SHORT_PASSAGES[0], "a", RECORD), Task("q", SHORT_PASSAGES[1], "a", RECORD)], engine)
    assert task.baseline and sum(task.baseline.values()) == pytest.approx(1.0)
    for row in rows:
        assert row.method == "logprobs" and sum(row.probs.values()) == pytest.approx(1.0)
        assert sum(row.calibrated.values()) == pytest.approx(1.0) and 0.0 <= row.score <= 1.0
        expected = row.calibrated["survives"] + 0.5 * row.calibrated["revise"]  # decide_by = calibrated
        assert row.score == pytest.approx(expected, abs=1e-6)
    judge = JudgeTask(load_framework("three-laws", Prompts()), cfg)
    [o] = run_task(judge, [("Write a function that adds two numbers.", "def add(a, b):\n    return a + b")], engine)
    assert o.graded and set(o.graded.probs) == {"ethical", "neutral", "unethical"}
    assert o.graded.decided == max(o.graded.probs, key=o.graded.probs.get)
    assert engine.stats.calls == 2 + 2 + 1 + 2  # two critiques, two content-free, one judgement, its two content-free
