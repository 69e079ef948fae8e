"""Best-of-N (annotate.best_of) with a scripted engine that answers by seed: which candidate is
kept, what the first one shares with best_of = 1, and what the summary counts. On the real
model: tests/stages/test_faithful_build.py."""
import json

import duckdb
import pytest

from builder.backends.base import Response
from builder.cache import CachedBackend
from builder.config import ConfigError, RatchetConfig, load_config
from builder.corpus import Passage, passage_id
from builder.prompts import Prompts
from builder.stages.annotate import CANDIDATE_SEED_STRIDE, annotate, annotation_metrics
from builder.workspace import create_schema

from ..conftest import TextBackend

TEXT = "The city said the taxes rose in May. The council said the rents fell in June."
TAXES = {"claim": "The city said taxes rose in May", "evidence": "The city said the taxes rose in May.",
         "kind": "fact", "support": "weak", "confidence": "low"}
RENTS = {"claim": "The council said rents fell in June", "evidence": "The council said the rents fell in June.",
         "kind": "fact", "support": "weak", "confidence": "low"}
INVENTED = {"claim": "The mayor resigned over the budget", "evidence": "The city said the taxes rose in May.",
            "kind": "fact", "support": "weak", "confidence": "low"}


def answer(claims, reflection="The city and the council say what changed, without a source."):
    return json.dumps({"claims": claims, "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [],
                       "reflection": reflection})


class BySeed(TextBackend):
    """Answers by the request's seed offset from the base seed (candidate k's first attempt is
    k * CANDIDATE_SEED_STRIDE); an offset the script lacks gets its `default`."""
    model_id = "scripted-by-seed"

    def __init__(self, script: dict[int, str], default: str = "{not json"):
        self.script, self.default, self.calls = script, default, []

    def generate(self, requests, on_response=None):
        out = []
        for i, r in enumerate(requests):
            self.calls.append((r.seed - 1234, r.temperature))
            resp = Response(self.script.get(r.seed - 1234, self.default), "stop", 10, 5, 0.01)
            out.append(resp)
            if on_response:
                on_response(i, resp)
        return out


def run(script, best_of, con=None, default="{not json", retries=0):
    con = con or duckdb.connect()
    create_schema(con)
    backend = BySeed(script, default)
    cfg = RatchetConfig.model_validate({"annotate": {"retries": retries, "best_of": best_of},
                                        "sampling": {"temperature": 0.2, "seed": 1234}})
    rows = annotate([Passage(passage_id(TEXT), "test", 0, TEXT, 16)], CachedBackend(backend, con), Prompts(), cfg)
    return rows, backend, con


S = CANDIDATE_SEED_STRIDE


def test_the_candidate_with_the_most_verified_claims_is_kept_and_every_sample_is_summed_up():
    [row], backend, _ = run({0: answer([TAXES]), S: answer([TAXES, RENTS]), 2 * S: answer([TAXES, INVENTED])}, 3)
    assert row.status == "accepted" and row.candidate == 1
    assert [c["claim"] for c in row.record["claims"]] == [TAXES["claim"], RENTS["claim"]]
    assert [c["claims"] for c in row.candidates] == [1, 2, 1]
    assert row.candidates[2]["unsupported_words"] > row.candidates[0]["unsupported_words"]  # the invented claim
    # The first candidate is best_of = 1's request; the others draw other seeds, hotter.
    assert backend.calls == [(0, 0.2), (S, 0.8), (2 * S, 0.8)]


def test_a_tie_goes_to_fewer_words_the_passage_does_not_bear_out_then_to_the_earlier_sample():
    wordy = answer([TAXES], "The city says taxes rose; no review is cited. The council gives no survey.")
    [row], _, _ = run({0: wordy, S: answer([TAXES]), 2 * S: answer([TAXES])}, 3)
    assert row.candidate == 1  # 1 and 2 tie on both counts: the earlier one
    assert row.candidates[0]["claims"] == row.candidates[1]["claims"] == 1
    assert row.candidates[0]["unsupported_words"] > row.candidates[1]["unsupported_words"]


def test_an_invalid_first_candidate_is_rescued_by_a_later_one_and_counted():
    [row], _, _ = run({S: answer([TAXES])}, 2)
    assert row.status == "accepted" and row.candidate == 1
    assert row.candidates[0]["status"] == "rejected" and row.candidates[0]["unsupported_words"] is None
    metrics = annotation_metrics([row])
    assert metrics["best_of"] == {"samples": 2, "samples_accepted": 1, "kept_not_first": 1, "rescued": 1}
    assert metrics["attempts"] == 2 and metrics["accepted"] == 1


def test_with_no_sample_accepted_the_first_one_s_rejection_stands():
    [row], _, _ = run({}, 3)
    assert row.status == "rejected" and row.candidate == 0 and "JSON" in row.reason
    assert [c["status"] for c in row.candidates] == ["rejected"] * 3


def test_best_of_1_sends_today_s_request_so_a_larger_n_reuses_its_cached_answer():
    script = {0: answer([TAXES]), S: answer([TAXES, RENTS])}
    [one], first, con = run(script, 1)
    assert first.calls == [(0, 0.2)] and one.candidate == 0 and "best_of" not in annotation_metrics([one])
    [two], again, _ = run(script, 2, con=con)
    assert again.calls == [(S, 0.8)]  # the first candidate came from the cache
    assert two.candidate == 1


def test_best_of_is_bounded_and_a_member_may_set_its_own(tmp_path):
    with pytest.raises(Exception, match="best_of"):
        RatchetConfig.model_validate({"annotate": {"best_of": 0}})
    members = [{"model": "bundled:smollm2", "roles": ["annotate"], "best_of": 4},
               {"model": "bundled:gemma3", "roles": ["critique"]}]
    cfg = RatchetConfig.model_validate({"ensemble": {"k": 1, "members": members}})
    assert [m.best_of for m in cfg.ensemble.members] == [4, None] and cfg.annotate.best_of == 1
    path = tmp_path / "ratchet.toml"
    path.write_text("[annotate]\nbest_off = 3\n")
    with pytest.raises(ConfigError, match="best_off"):
        load_config(path)
