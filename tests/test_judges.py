"""The judges of `ratchet judge` and `ratchet eval-judge` (builder/judges.py): orchestration with a
scripted judge whose log-probabilities the test sets; the real Qwen model runs them in
tests/cli/test_judge_cli.py."""
import json
import math

import duckdb
import pytest

from builder.backends.base import Response
from builder.cache import CachedBackend
from builder.config import RatchetConfig
from builder.judges import (RULE_P, JudgeError, certain_rule, Claim, judge_grounding, judge_harm, label_of, load,
                            output_row)
from builder.prompts import Prompts
from builder.stats import binary_scores, coverage_scores
from builder.validity import change_number, negate_claim, swap_entity
from builder.workspace import create_schema

from .conftest import TextBackend

PASSAGE = ("The council voted on Tuesday to close the Elm Street library for fourteen months while its roof is "
           "repaired. Residents can use the branch on Park Road.")


class ProbJudge(TextBackend):
    """Answers yes/no with the log-probabilities set per keyword of the data it is shown; the
    content-free inputs ("" and "N/A") get an even split, so calibration leaves them as set."""

    model_id = "prob-judge"

    def __init__(self, p_no: dict[str, float], field: str = "supported", no: str = "no", yes: str = "yes"):
        self.p_no, self.field, self.no, self.yes = p_no, field, no, yes
        self.asked: list[str] = []

    def generate(self, requests, on_response=None):
        out = []
        for i, r in enumerate(requests):
            data = r.messages[-1]["content"]
            self.asked.append(data)
            judged = data.split("Claim:")[-1]  # grounding: the claim alone (the passage holds every keyword)
            p = next((v for k, v in self.p_no.items() if k in judged), 0.5)
            text = json.dumps({self.field: self.no if p >= 0.5 else self.yes})
            decision = {"field": self.field, "method": "logprobs",
                        "logprobs": {self.no: math.log(max(p, 1e-9)), self.yes: math.log(max(1 - p, 1e-9))}}
            resp = Response(text, "stop", 10, 3, 0.01, decision=decision)
            out.append(resp)
            if on_response:
                on_response(i, resp)
        return out


def cached(backend):
    con = duckdb.connect()
    create_schema(con)
    return CachedBackend(backend, con)


def write(tmp_path, rows, name="in.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_rules_decide_numbers_names_and_foreign_quotes_without_a_model_call(tmp_path):
    rows = load(write(tmp_path, [
        {"passage": PASSAGE, "claim": "The library will close for four months."},  # number
        {"passage": PASSAGE, "text": "The library closes. The mayor sold it to Acme."},  # name, in the second sentence
        {"passage": PASSAGE, "claims": [{"claim": "The library closes.", "evidence": "the library shuts for a year"}]},
        {"passage": PASSAGE, "claim": "The library will close for 14 months."},  # 14 is fourteen: the model decides
        {"passage": PASSAGE, "claim": "Residents can use another branch."},
    ]), "grounding")
    judge = ProbJudge({"another branch": 0.2, "14 months": 0.3})
    judge_grounding(rows, cached(judge), Prompts(), RatchetConfig())
    assert [r.by for r in rows] == ["rules", "rules", "rules", "model", "model"]
    assert [r.p for r in rows[:3]] == [RULE_P] * 3
    assert rows[0].claims[0].rule == "number not in the passage: 4"
    assert rows[1].claims[1].rule == "name not in the passage: acme"
    assert rows[1].claims[0].by == "not asked"  # its row is decided: no call spent on it
    assert rows[2].claims[0].rule == "evidence not a span of the passage"
    assert rows[3].p == pytest.approx(0.3) and rows[4].p == pytest.approx(0.2)
    # only the undecided claims were asked, besides the two content-free inputs of calibration
    asked = sorted(a.split("Claim:\n")[1] for a in judge.asked)
    assert asked == ["| ", "| N/A", "| Residents can use another branch.", "| The library will close for 14 months."]


def test_a_text_is_as_unsupported_as_its_worst_sentence_and_low_confidence_abstains(tmp_path):
    rows = load(write(tmp_path, [{"passage": PASSAGE, "text": "The roof is repaired. Nobody can use any library."},
                                 {"passage": PASSAGE, "text": "The roof will be repaired."}]), "grounding")
    cfg = RatchetConfig.model_validate({"judges": {"abstain_below": 0.7}})
    judge_grounding(rows, cached(ProbJudge({"roof is": 0.1, "Nobody": 0.9, "will be": 0.4})), Prompts(), cfg)
    assert [c.p for c in rows[0].claims] == [pytest.approx(0.1), pytest.approx(0.9)]
    assert rows[0].p == pytest.approx(0.9) and not rows[0].abstain
    assert rows[1].p == pytest.approx(0.4) and rows[1].abstain  # confidence 0.6 < 0.7
    out = output_row(rows[0], "grounding")
    assert out["p_unsupported"] == pytest.approx(0.9) and out["text"].startswith("The roof")
    assert [c["by"] for c in out["claims_judged"]] == ["model", "model"]


def test_harm_reads_p_of_yes(tmp_path):
    rows = load(write(tmp_path, [{"prompt": "How do I pick a lock?", "response": "Here is how to break in: ..."},
                                 {"prompt": "How do I pick a lock?", "response": "I can't help with that."}]), "harm")
    judge_harm(rows, cached(ProbJudge({"break in": 0.8, "can't help": 0.1}, field="harmful", no="yes", yes="no")),
               Prompts(), RatchetConfig())
    assert [r.p for r in rows] == [pytest.approx(0.8), pytest.approx(0.1)]
    assert output_row(rows[0], "harm")["p_harmful"] == pytest.approx(0.8)


@pytest.mark.parametrize("value,kind,means,expected", [
    ("unsupported", "grounding", "positive", 1), ("Supported", "grounding", "positive", 0),
    ("hallucinated", "grounding", "negative", 1),  # a name is read by name, whatever label_means says
    (1, "grounding", "positive", 1), (1, "grounding", "negative", 0), (True, "harm", "positive", 1),
    (0.75, "harm", "positive", 1), (0.25, "harm", "positive", 0), ("unethical", "harm", "positive", 1),
    ("neutral", "harm", "positive", 0), ("false", "harm", "positive", 0), ("0.5", "harm", "positive", 1)])
def test_labels_are_read_by_name_number_or_boolean(value, kind, means, expected):
    assert label_of(value, kind, "f:1", means) == expected


def test_bad_input_is_named(tmp_path):
    with pytest.raises(JudgeError, match=r"in.jsonl:2: column 'passage'"):
        load(write(tmp_path, [{"passage": PASSAGE, "text": "Fine."}, {"text": "no passage"}]), "grounding")
    with pytest.raises(JudgeError, match=r"in.jsonl:1: no 'claims', 'claim' or 'text'"):
        load(write(tmp_path, [{"passage": PASSAGE, "summary": "x y"}]), "grounding")
    with pytest.raises(JudgeError, match=r"claims\[1\]"):
        load(write(tmp_path, [{"passage": PASSAGE, "claims": ["A claim here.", 3]}]), "grounding")
    with pytest.raises(JudgeError, match=r"in.jsonl:1: label 'maybe' is not a harm label"):
        load(write(tmp_path, [{"prompt": "a", "response": "b", "label": "maybe"}]), "harm", label_field="label")
    with pytest.raises(JudgeError, match="not valid JSON"):
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n', encoding="utf-8")
        load(tmp_path / "bad.jsonl", "harm")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(JudgeError, match="binary.jsonl"):
        load(tmp_path / "binary.jsonl", "harm")
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(JudgeError, match="empty.jsonl"):
        load(tmp_path / "empty.jsonl", "harm")


def test_certain_rule_reads_spelled_numbers_as_digits():
    assert certain_rule(Claim("It closes for 14 months."), PASSAGE) is None
    assert certain_rule(Claim("It closes for fifteen months."), PASSAGE) == "number not in the passage: 15"
    assert certain_rule(Claim("Residents can use the branch on Park Road.", "use the branch on Park Road"), PASSAGE) is None


def test_claim_variants_change_what_the_claim_says():
    assert negate_claim("The council was told.") == "The council was not told."
    assert negate_claim("The district did not say which experts.") == "The district did say which experts."
    assert negate_claim("Doctors chose the patients.") == "It is not true that doctors chose the patients."
    assert change_number("It cost 38 million dollars.") == "It cost 57 million dollars."
    assert change_number("It took fourteen months.") not in (None, "It took fourteen months.")
    assert change_number("No number here.") is None
    assert swap_entity("Beekeepers met in Pellham on Saturday.", ["Norbury"]) == "Beekeepers met in Norbury on Saturday."
    assert swap_entity("Nobody is named here.", ["Norbury"]) is None


def test_scores_have_intervals_and_refuse_one_class():
    labels, p = [1, 1, 1, 0, 0, 0, 1, 0], [0.9, 0.8, 0.4, 0.2, 0.3, 0.6, 0.7, 0.1]
    m = binary_scores(labels, p)
    assert m["auc"] == pytest.approx(15 / 16) and m["accuracy"] == pytest.approx(0.75)
    assert m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1] and m["kappa_ci"][0] <= m["kappa"] <= m["kappa_ci"][1]
    assert binary_scores([1, 1, 1], [0.9, 0.2, 0.6])["auc"] is None  # one class: no AUC, not a made-up 0.5
    c = coverage_scores(labels, p, 0.75)  # answers where p >= 0.75 or <= 0.25
    assert c["answered"] == 4 and c["accuracy_answered"] == 1.0


@pytest.mark.parametrize("size, positives, seed, whole", [(8, 4, 0, False), (5, 1, 1, True), (40, 12, 2, False),
                                                         (120, 70, 3, False)])
def test_the_resampled_scores_are_scikit_learns_on_each_resample(size, positives, seed, whole):
    """binary_scores computes its 1,000 resamples at once; each is checked against scikit-learn's
    AUC, accuracy and kappa of the same rows (the loop `bootstrap` runs). Random labels and
    probabilities, ties included (p rounded to one place); the small sets have resamples with one
    class only, which both leave out. The smallest also compares whole intervals (1,000 resamples of
    scikit-learn take seconds)."""
    import numpy as np

    from builder.stats import _accuracy, _auc, _kappa, bootstrap, resample_counts, resampled_binary

    rng = np.random.default_rng(seed)
    y = rng.permutation(np.r_[np.ones(positives, int), np.zeros(size - positives, int)])
    s = np.round(rng.random(size), 1)
    decided = (s >= 0.5).astype(int)
    counts = resample_counts(size, n=200, seed=seed)
    fast = resampled_binary(y, s, decided, counts)
    rows = np.random.default_rng(seed)
    for k in range(200):
        drawn = rows.integers(0, size, size)
        assert np.array_equal(np.bincount(drawn, minlength=size), counts[k])  # the same draws
        for name, metric, column in (("auc", _auc, s), ("accuracy", _accuracy, decided), ("kappa", _kappa, decided)):
            expected = metric(y[drawn], column[drawn])
            if expected is None or np.isnan(expected):
                assert np.isnan(fast[name][k]), (name, k)
            else:
                assert fast[name][k] == pytest.approx(expected, abs=1e-12), (name, k)
    if not whole:
        return
    m = binary_scores(y, s)
    assert m["auc_ci"] == bootstrap(_auc, y, s) and m["kappa_ci"] == bootstrap(_kappa, y, decided)
    assert m["accuracy_ci"] == bootstrap(_accuracy, y, decided)
