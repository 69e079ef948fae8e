"""Meta-evaluation by perturbation (builder/validity.py): the variants are worse in the way
they say, and the AUC is the probability that an original outscores its variant."""
import pytest

from builder.validity import FOREIGN, PERTURBATIONS, auc, perturb
from builder.verifier import check

PASSAGE = "The city council says the new bridge cut commuting times by 40 percent, but it has published no data."
RECORD = {"claims": [{"evidence": "the new bridge cut commuting times by 40 percent", "claim": "The bridge cut times",
                      "kind": "fact", "support": "strong", "confidence": "high"},
                     {"evidence": "it has published no data", "claim": "No data was published", "kind": "fact",
                      "support": "moderate", "confidence": "high"}],
          "weak_reasoning": ["a figure without data"], "uncertainties": ["how it was measured"], "ethical_stakes": [],
          "reflection": "A council figure without published data deserves little trust."}
OTHER = {**RECORD, "claims": [{**RECORD["claims"][0], "evidence": "everyone I know loves the new phone"}]}


def test_each_variant_is_worse_in_the_way_its_name_says():
    variants = {v.kind: v.record for v in perturb("p", PASSAGE, RECORD, OTHER)}
    assert list(variants) == list(PERTURBATIONS)
    assert variants["other"] == OTHER
    assert all(c["evidence"] in FOREIGN for c in variants["evidence"]["claims"])
    assert [c["support"] for c in variants["support"]["claims"]] == ["none", "weak"]
    assert variants["negated"]["claims"][0]["claim"] == "It is not the case that the bridge cut times"
    assert len(variants["cut"]["claims"]) == 1 and variants["cut"]["weak_reasoning"] == []
    assert RECORD["claims"][0]["support"] == "strong"  # the original is left as it was


def test_the_verifier_sees_the_grounding_perturbations_and_not_the_others():
    variants = {v.kind: v.record for v in perturb("p", PASSAGE, RECORD, OTHER)}
    original = check(PASSAGE, RECORD).share
    assert original == 1.0
    assert check(PASSAGE, variants["other"]).share < original and check(PASSAGE, variants["evidence"]).share == 0.0
    assert check(PASSAGE, variants["support"]).share == original  # what a quote check cannot see


def test_auc_is_the_chance_that_an_original_outscores_a_variant():
    assert auc([0.9, 0.8], [0.1, 0.2]) == 1.0
    assert auc([0.1, 0.2], [0.9, 0.8]) == 0.0
    assert auc([0.5, 0.5], [0.5, 0.5]) == 0.5  # every score equal: noise, not a perfect judge
    assert auc([0.9, 0.4], [0.5, 0.1]) == pytest.approx(0.75)
    assert auc([], [0.1]) is None
