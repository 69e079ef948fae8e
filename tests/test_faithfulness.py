"""The faithfulness gates (builder/faithfulness.py) by rule, on hand-made cases named after the
failures an independent audit of the demo found (issue 29). Their effect on a real model's
annotations is tested in tests/stages/test_faithful_build.py."""
import jsonschema
import pytest

from builder import faithfulness as f
from builder.prompts import Prompts

# The built-in few-shot examples (shown to members with few_shot = true): every bundled model
# copied their notes into reflections of other passages (docs/faithfulness.md).
FORM_EXAMPLES = Prompts().examples

BRIDGE = ("The Marlow Bay harbour bridge reopened to traffic on Tuesday after fourteen months of repairs costing "
          "38 million dollars, according to the regional transport office. Engineers replaced 212 corroded steel "
          "cables and resurfaced the full deck. Several shop owners near the bridge said the closure had hurt their "
          "sales, but none of them would give figures.")
BANK = ("Economists at Greyford Bank expect average house prices in the northern region to fall by between 3 and 5 "
        "percent next year, as higher interest rates bite.")


def claim(evidence, text, **rest):
    return {"evidence": evidence, "claim": text, "kind": "fact", "support": "strong", "confidence": "high", **rest}


def record(*claims, reflection="The passage reports a reopening and gives no source for its cost.", **notes):
    return {"claims": list(claims), "weak_reasoning": [], "uncertainties": [], "ethical_stakes": [],
            "reflection": reflection, **notes}


def test_spans_are_the_passages_sentences_and_clauses_and_nothing_else():
    spans = f.passage_spans(BRIDGE)
    assert "Engineers replaced 212 corroded steel cables and resurfaced the full deck." in spans
    assert "according to the regional transport office." in spans  # a clause of the first sentence
    assert "but none of them would give figures." in spans
    assert all(f.span_of(s, BRIDGE) for s in spans)
    assert len(spans) == len(set(spans))
    assert f.passage_spans("| A line\n| that was marked") == ["A line", "that was marked"] or \
        all("|" not in s for s in f.passage_spans("| A line\n| that was marked"))


def test_the_request_schema_admits_only_the_passages_spans_as_evidence():
    schema = f.annotation_schema(BRIDGE)
    validator = jsonschema.Draft202012Validator(schema)
    good = record(claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                        "Engineers replaced 212 cables"))
    assert validator.is_valid(good)
    stitched = record(claim("reopened to traffic on Tuesday after fourteen months", "The bridge reopened"))
    assert not validator.is_valid(stitched)  # a piece of a clause, not a whole span: not in the enum
    foreign = record(claim("workers who refuse them lose their bonus", "Workers lose their bonus"))
    assert not validator.is_valid(foreign)


def test_a_stitched_quote_is_not_a_span_but_spacing_case_and_quote_marks_do_not_matter():
    assert f.span_of("the  Marlow BAY harbour bridge", BRIDGE)
    assert f.span_of("| Engineers replaced 212 corroded steel cables", BRIDGE)  # a copied data mark
    assert not f.span_of("bridge reopened to traffic on Tuesday after fourteen months of repairs corroded steel cables",
                         BRIDGE)  # word pairs of two sentences, stitched
    assert not f.span_of("the bridge reopened ... the full deck", BRIDGE)  # no ellipsis
    assert not f.span_of("", BRIDGE)


@pytest.mark.parametrize("text, evidence, reason", [
    ("The bridge reopened after four months", "The Marlow Bay harbour bridge reopened to traffic on Tuesday after "
     "fourteen months of repairs costing 38 million dollars", "number not in its evidence: four"),
    ("The Bank of England expects prices to fall", BANK, "name not in its evidence: england"),
    ("The shop owners gave no figures", "Several shop owners near the bridge said the closure had hurt their sales",
     "negation differs"),
    ("The plant will reduce the workforce by cutting wages", "Engineers replaced 212 corroded steel cables and "
     "resurfaced the full deck.", "not what its evidence says"),
])
def test_a_claim_that_is_not_what_its_quote_says_is_dropped_with_the_reason(text, evidence, reason):
    passage = BRIDGE + " " + BANK
    assert reason in f.check_claim(text, evidence, passage)


def test_a_claim_that_restates_or_shortens_its_quote_passes():
    assert f.check_claim("Greyford Bank economists expect house prices to fall by 3 to 5 percent",
                         "Economists at Greyford Bank expect average house prices in the northern region to fall by "
                         "between 3 and 5 percent next year", BANK) is None
    assert f.check_claim("None of the shop owners would give figures", "but none of them would give figures.",
                         BRIDGE) is None


def test_the_gate_drops_failing_claims_and_vetoes_a_reflection_left_without_one():
    good = claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                 "Engineers replaced 212 steel cables")
    bad = claim("according to the regional transport office.", "The office spent 40 million dollars")
    gated = f.gate(record(good, bad), BRIDGE, set())
    assert gated.veto is None and gated.record["claims"] == [good]
    assert [c["verdict"] for c in gated.claim_checks] == ["supported", "dropped"]
    assert gated.claim_checks[1]["reason"].startswith("number not in its evidence")
    assert f.gate(record(bad), BRIDGE, set()).veto.startswith("no supported claim")


def test_a_claim_that_repeats_a_kept_one_is_dropped_as_repeated():
    good = claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                 "Engineers replaced 212 steel cables")
    again = {**good, "claim": "engineers replaced 212 steel cables."}  # case and punctuation aside: the same words
    gated = f.gate(record(good, again), BRIDGE, set())
    assert gated.record["claims"] == [good] and [c["verdict"] for c in gated.claim_checks] == ["supported", "dropped"]
    assert gated.claim_checks[1]["reason"].startswith(f.REPEATED)
    # A repeat of a claim that was itself dropped is judged on its own: nothing kept says it yet.
    bad = claim("according to the regional transport office.", "The office spent 40 million dollars")
    assert [c["verdict"] for c in f.gate(record(bad, bad, good), BRIDGE, set()).claim_checks] == \
        ["dropped", "dropped", "supported"]


def test_a_claim_its_passage_says_with_the_wrong_quote_keeps_the_span_that_says_it():
    # what the demo's writer does most: the right claim, the neighbouring sentence as its quote
    wrong = claim("Several shop owners near the bridge said the closure had hurt their sales",
                  "Engineers replaced 212 corroded steel cables")
    gated = f.gate(record(wrong), BRIDGE, set())
    assert gated.veto is None
    kept = gated.record["claims"][0]
    assert kept["evidence"] == "Engineers replaced 212 corroded steel cables and resurfaced the full deck."
    assert f.check_claim(kept["claim"], kept["evidence"], BRIDGE) is None and f.span_of(kept["evidence"], BRIDGE)
    check = gated.claim_checks[0]
    assert check["verdict"] == "supported" and check["evidence"] == kept["evidence"]
    assert check["reason"].startswith(f.REQUOTED) and "Several shop owners" in check["reason"]
    # of two spans that hold it, the one with more of its words; a claim no span holds is still dropped
    assert f.requote("The bridge reopened after fourteen months of repairs", BRIDGE) == (
        "The Marlow Bay harbour bridge reopened to traffic on Tuesday after fourteen months of repairs costing 38 "
        "million dollars")  # the clause, shorter than its sentence with the same words
    assert f.requote("The office spent 40 million dollars", BRIDGE) is None
    assert f.requote("The bridge reopened after four months", BRIDGE) is None


COFFEE = ("A press release from the Oranmore Institute announced that coffee boosts memory, after a study found that "
          "volunteers who drank two cups recalled slightly more words. The study involved 24 students.")


def test_a_claim_that_states_as_fact_what_its_quote_only_reports_is_dropped():
    quote = "A press release from the Oranmore Institute announced that coffee boosts memory"
    assert f.check_claim("Coffee boosts the memory", quote, COFFEE).startswith("attribution dropped")
    # keeping the reporting, or speaking about the passage, is what the quote says
    assert f.check_claim("A press release announced that coffee boosts memory", quote, COFFEE) is None
    assert f.check_claim("The passage states that coffee boosts memory", quote, COFFEE) is None
    # no way round it through a weaker span of the same sentence
    assert f.requote("Coffee boosts the memory", COFFEE) is None
    # a clause the reporting verb does not govern is the writer's own statement
    assert f.check_claim("None of the shop owners would give figures", "but none of them would give figures.",
                         BRIDGE) is None


def test_notes_with_a_name_or_number_the_passage_lacks_are_dropped_and_such_a_reflection_is_vetoed():
    good = claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.", "212 cables replaced")
    gated = f.gate(record(good, uncertainties=["Who paid the 38 million dollars", "Whether the Bank of England paid"]),
                   BRIDGE, set())
    assert gated.record["uncertainties"] == ["Who paid the 38 million dollars"] and gated.dropped_notes == 1
    veto = f.gate(record(good, reflection="A repair of four months is quick for a bridge."), BRIDGE, set()).veto
    assert veto == "reflection: number not in the passage: four"


def test_a_reflection_that_copies_a_prompt_example_is_an_echo_unless_its_passage_says_the_same():
    runs = f.example_runs(FORM_EXAMPLES)
    copied = record(claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                          "Engineers replaced 212 cables"),
                    ethical_stakes=["Readers may plan a trip when the bridge is closed"])
    assert f.gate(copied, BRIDGE, runs).veto.startswith("echo: shares 'may plan a trip'")
    own = BRIDGE + " Readers may plan a trip when the bridge is closed."
    assert f.gate(copied, own, runs).veto is None  # the passage's own words are no echo


@pytest.mark.parametrize("word", ["neighb.", "claiim", "kindserved", "interest-b", "sales读", "离婚", "swm"])
def test_garbled_or_cut_words_veto_the_reflection(word):
    good = claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.", "212 cables replaced")
    gated = f.gate(record(good, reflection=f"The shop owners near the bridge gave no {word}"), BRIDGE, set())
    assert gated.veto and gated.veto.startswith("garbled")


def test_letters_of_other_scripts_are_garbled_unless_the_passage_uses_them():
    assert f.unknown_word("the café and the naïve résumé", BRIDGE) is None  # Latin letters with accents
    assert f.unknown_word("It may have diluted the读.", BRIDGE) == "读"
    assert f.unknown_word("the 東京 office", BRIDGE + " The 東京 office agreed.") is None


def test_ordinary_words_and_the_passages_own_rare_words_are_not_garbled():
    assert f.unknown_word("Shopkeepers' sales figures weren't published; it's unclear.", BRIDGE) is None
    assert f.unknown_word("Marlow Bay's resurfaced deck", BRIDGE) is None


def test_short_words_pass_when_common_or_the_passages_own():
    """'swm' (a kept reflection's last word in the demo audited through the page) is in the long
    word list but is no word; short words and abbreviations people write are common enough."""
    assert f.unknown_word("The NHS, the EU and the CEO say it's ok: 4 kWh a day, up by a third.", BRIDGE) is None
    assert f.unknown_word("empty hives and weak spring swm", BRIDGE) == "swm"
    assert f.unknown_word("the swm crossing", BRIDGE + " The SWM crossing reopened.") is None


def test_the_shipped_examples_pass_their_own_gates():
    """The few-shot examples teach the form the gates enforce: each quotes a span of its passage,
    each claim is what its quote says, and nothing in them is garbled."""
    assert FORM_EXAMPLES
    for example in FORM_EXAMPLES:
        gated = f.gate(example["annotation"], example["passage"], set())
        assert gated.veto is None and gated.dropped == 0 and gated.dropped_notes == 0, gated
        assert jsonschema.Draft202012Validator(f.annotation_schema(example["passage"])).is_valid(example["annotation"])


def test_a_claim_may_use_no_content_word_its_passage_never_uses_but_words_about_the_quote():
    passage = BRIDGE
    quote = "The Marlow Bay harbour bridge reopened to traffic on Tuesday after fourteen months of repairs costing 38 " \
            "million dollars, according to the regional transport office."
    assert f.check_claim("The passage states that the bridge reopened on Tuesday", quote, passage) is None
    assert f.check_claim("The bridge reopened as a temporary measure on Tuesday", quote, passage) == \
        "a word its passage never uses: temporary"
    assert f.check_claim("The transport office's figures show the bridge reopened", quote, passage) is None  # office's


def test_a_reflection_sentence_with_words_its_passage_never_uses_is_cut_and_nothing_left_is_a_veto():
    """The prose is held to the passage as the claims are. The invented sentence is one the
    demo's writer wrote of a passage on a reservoir (docs/faithfulness.md); the kept one speaks of
    the passage in its words and in words about the passage (META)."""
    good = claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                 "Engineers replaced 212 steel cables")
    faithful = "The passage says engineers replaced corroded cables, but the shop owners would give no figures."
    invented = "It also highlights the importance of understanding and respecting human rights, especially for dams."
    assert len(f.foreign_words(invented, BRIDGE)) >= f.FOREIGN_LIMIT > len(f.foreign_words(faithful, BRIDGE)) == 0
    gated = f.gate(record(good, reflection=f"{faithful} {invented}"), BRIDGE, set())
    assert gated.veto is None and gated.record["reflection"] == faithful and gated.dropped_notes == 1
    assert f.gate(record(good, reflection=faithful), BRIDGE, set()).record["reflection"] == faithful  # untouched
    vetoed = f.gate(record(good, reflection=invented), BRIDGE, set())
    assert vetoed.veto.startswith("reflection: no sentence its passage bears out")


def test_a_name_in_the_possessive_is_the_passages_name():
    """A reflection of a demo build was vetoed for "the Alliance's" of a passage naming "the Clean
    Motion Alliance": a possessive names what the bare word does, on either side."""
    alliance = "Every car will be electric by 2030, the Clean Motion Alliance declared at its annual conference."
    assert f.check_note("The Alliance's forecast rests on battery prices alone.", alliance) is None
    assert f.check_note("The Alliance's forecast rests on Tesla's prices.", alliance).startswith("name not in")
    assert f.check_note("The Alliance forecast it.", alliance.replace("Alliance", "Alliance's")) is None
    assert f.check_claim("The Alliance's annual conference declared it", "the Clean Motion Alliance declared at its annual "
                         "conference.", alliance) is None


# Claims a reader found wrong in the kept reflections of the default writer's best-of-3 run on the
# demo corpus (bench/best_of.py, 2026-12-06): the rules below were written after reading them (in
# sample); each is paired with claims of the same run the reader found right, which must pass.
TEXTILES = ("Brightwell Textiles will close its plant in Norbury next March, cutting 340 jobs, the company confirmed. "
            "Managers blamed rising energy costs and cheaper imports. The company said it would offer retraining "
            "funds, but did not say how much money had been set aside.")
TURNOUT = ("The Green Lanes Party won six of the twenty-one seats, gaining four. Party leaders disagreed about whether "
           "the higher turnout reflected new postal voting rules or stronger interest in local issues.")
SOLAR = ("My neighbour put solar panels on his roof two years ago and has had nothing but trouble. Solar power is "
         "clearly a waste of money.")


def test_a_claim_wrapped_in_words_about_itself_is_unwrapped_and_checked_as_what_it_says():
    wrapped = claim("Managers blamed rising energy costs and cheaper imports.",
                    "The passage supports this claim by saying that managers blamed rising energy costs and cheaper "
                    "imports.")
    gated = f.gate(record(wrapped), TEXTILES, set())
    assert gated.record["claims"][0]["claim"] == "Managers blamed rising energy costs and cheaper imports."
    assert gated.claim_checks[0]["reason"].startswith(f.UNWRAPPED)
    assert f.unwrapped("The evidence supports the claim that sales tripled this year.") == "Sales tripled this year."
    assert f.unwrapped("The claim that managers kept selling") == "Managers kept selling"
    # Saying who says it is no wrapper: "The passage states that X" stays as written.
    assert f.unwrapped("The passage states that the plant will close") == "The passage states that the plant will close"
    assert f.unwrapped("Claims that the plant will close were denied") == "Claims that the plant will close were denied"


@pytest.mark.parametrize("text, evidence, passage, reason", [
    ("The claim is opinion, because the passage provides evidence of the closure.",
     "Brightwell Textiles will close its plant in Norbury next March", TEXTILES, "not a claim: it says what kind"),
    ("preliminary", "Managers blamed rising energy costs and cheaper imports.", TEXTILES, "not a claim: fewer than"),
    ("The company would offer retraining funds, but did not say",
     "The company said it would offer retraining funds, but did not say how much money had been set aside.",
     TEXTILES, "cut off"),
    ("Solar power is a waste of money. Anyone thinking of installing panels,", "Solar power is clearly a waste of "
     "money.", SOLAR, "cut off"),
    ("We have nothing but trouble with solar panels", "My neighbour put solar panels on his roof two years ago and "
     "has had nothing but trouble.", SOLAR, "first person its passage never uses: 'we'"),
    ("Higher turnout reflected new postal voting rules", "Party leaders disagreed about whether the higher turnout "
     "reflected new postal voting rules or stronger interest in local issues.", TURNOUT, "stated as settled"),
    # from a second run of the same writer (also in sample)
    ("Because it states that the plant will close.", "Brightwell Textiles will close its plant in Norbury next March",
     TEXTILES, "not a claim: it says what kind of claim it is or why"),
    ("Managers blamed rising energy costs when", "Managers blamed rising energy costs and cheaper imports.", TEXTILES,
     "cut off"),
    # from the demo build read blind on 2026-12-06 (in sample)
    ("Will the plant close?", "Brightwell Textiles will close its plant in Norbury next March", TEXTILES,
     "not a claim: a question"),
])
def test_a_claim_that_says_nothing_or_more_than_its_quote_is_dropped(text, evidence, passage, reason):
    assert reason in f.check_claim(text, evidence, passage)


@pytest.mark.parametrize("text, evidence, passage", [
    ("Managers blamed rising energy costs and cheaper imports", "Managers blamed rising energy costs and cheaper "
     "imports.", TEXTILES),
    ("Party leaders disagreed about whether turnout reflected postal voting rules", "Party leaders disagreed about "
     "whether the higher turnout reflected new postal voting rules or stronger interest in local issues.", TURNOUT),
    ("The Green Lanes Party won six seats", "The Green Lanes Party won six of the twenty-one seats, gaining four.",
     TURNOUT),
    ("Solar power is a waste of money, my neighbour's trouble suggests", "Solar power is clearly a waste of money.",
     SOLAR),
    ("Prices are higher than before", "Prices are higher than before.", "Prices are higher than before."),
    ("The city said taxes rose in May", "The city said the taxes rose in May.", "The city said the taxes rose in May."),
])
def test_a_whole_claim_in_the_passage_s_own_voice_passes(text, evidence, passage):
    assert f.check_claim(text, evidence, passage) is None


def test_a_note_that_repeats_the_audit_notice_is_dropped_unless_its_passage_speaks_of_audits():
    """Every writer is told its work may be audited; the default writer wrote "The company's data is
    not audited" into 9 of 84 kept reflections read (docs/faithfulness.md)."""
    notice = f.notice_stems(Prompts().audit_notice)
    assert notice == {"audit", "annot"}  # the notice's own words, not "sample" or "checked"
    notes = {"ethical_stakes": ["The company's data is not audited, so it could be used to harm workers.",
                                "Workers near the bridge could lose sales."],
             "uncertainties": ["The sample of annotations is checked independently against the passage."]}
    gated = f.gate(record(claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                                "Engineers replaced 212 steel cables"),
                          reflection="The passage is not audited. It gives no source for the cost.", **notes),
                   BRIDGE, set(), notice)
    assert gated.record["ethical_stakes"] == ["Workers near the bridge could lose sales."]
    assert gated.record["uncertainties"] == [] and gated.record["reflection"] == "It gives no source for the cost."
    assert gated.dropped_notes == 3
    audited = BRIDGE + " The repairs were audited by the state."  # the passage's own word: a note may use it
    assert f.gate(record(claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                               "Engineers replaced 212 steel cables"), reflection="The repairs were audited.",
                         ethical_stakes=["The audit may not be independent."]), audited, set(),
                  notice).dropped_notes == 0


PRESS = ("A press release from the Brainwell Institute announced that coffee boosts memory. The study behind it "
          "involved 24 university students tested on one afternoon. The researchers call the result preliminary.")


def test_a_reflection_sentence_that_endorses_what_its_passage_only_reports_is_cut():
    assert f.endorses_reported("The passage supports the claim that coffee boosts memory.", PRESS) == "announced"
    reflection, cut = f.borne_out("The passage supports the claim that coffee boosts memory. The study was small.",
                                  PRESS)
    assert reflection == "The study was small." and cut == 1
    # Kept: the reporting said, a support denied, and support for what the passage itself states.
    assert f.endorses_reported("The passage supports the claim that a press release announced that coffee boosts "
                               "memory.", PRESS) is None
    assert f.endorses_reported("The passage does not support the claim that coffee boosts memory.", PRESS) is None
    assert f.endorses_reported("The passage supports the claim that the study involved 24 university students.",
                               PRESS) is None


PLANT = ("Brightwell Textiles will close its plant in Norbury next March, cutting 340 jobs. The company said it "
         "would offer retraining funds, but did not say how much money had been set aside.")


@pytest.mark.parametrize("sentence, passage", [
    ("There are no mentions of retraining funds or how much money was set aside.", PLANT),  # it names the funds
    ("The passage does not provide any information about the exact cost of the repairs.", BRIDGE),  # 38 million
    ("It does not mention any shop owners who might have lost sales.", BRIDGE),
    ("The passage does not mention any ethical stakes or concerns.", BRIDGE),  # what no rule can check
    ("There is no information about who paid for the repairs.", BRIDGE),  # true, perhaps: no rule can tell
])
def test_a_sentence_saying_its_passage_lacks_what_it_does_not_say_it_lacks_is_cut(sentence, passage):
    """Read in 46 kept reflections (in sample): 34 such sentences, all in reflections a reader failed."""
    assert f.absence_not_stated(sentence, passage) is not None
    assert f.borne_out(sentence, passage, note=True) == ("", 1)


@pytest.mark.parametrize("sentence, passage", [
    ("The company did not say how much money had been set aside.", PLANT),
    ("None of the shop owners would give figures.", BRIDGE),  # a negation, not a claim about what is missing
    ("Some young people do not give up looking for work.", BRIDGE),  # "give up" is no verb of telling
    ("Engineers replaced 212 corroded steel cables.", BRIDGE),
])
def test_an_absence_the_passage_states_itself_is_kept(sentence, passage):
    assert f.absence_not_stated(sentence, passage) is None


def test_a_note_that_restates_its_fields_definition_or_stops_mid_sentence_is_dropped_and_others_kept():
    """schemas/annotation.schema.json defines ethical_stakes as "Who could be helped or harmed, and
    how"; small writers wrote the definition back ("The passage does not specify who could be helped
    or harmed"): 9 sentences of 46 kept reflections read, all but one in reflections the reader
    failed (bench/prose_rules.py)."""
    assert f.defines_its_field("It is not clear who could be helped or harmed by the closure.", BRIDGE) \
        == "who could be helped"
    assert f.defines_its_field("Shop owners near the bridge could be harmed by a long closure.", BRIDGE) is None
    notes = {"ethical_stakes": ["It is not clear who could be helped or harmed by the closure.",
                                "Shop owners near the bridge could be harmed by a long closure."],
             "weak_reasoning": ["The office gives the cost but not the source of the estimate and its"],
             "uncertainties": ["Whether the repairs will last. The reflection cannot say how far to trust the passage."]}
    gated = f.gate(record(claim("Engineers replaced 212 corroded steel cables and resurfaced the full deck.",
                                "Engineers replaced 212 steel cables"), **notes), BRIDGE, set())
    assert gated.veto is None
    assert gated.record["ethical_stakes"] == ["Shop owners near the bridge could be harmed by a long closure."]
    assert gated.record["weak_reasoning"] == []  # cut off on "its"
    assert gated.record["uncertainties"] == ["Whether the repairs will last."]
    assert gated.dropped_notes == 3


def test_a_note_may_reason_in_words_its_passage_never_uses_but_the_reflection_may_not():
    """A weak-reasoning note names what the passage leaves out, often in new words; the shipped
    examples do ("New players improve quickly anyway, so the course may not be the cause")."""
    note = "New owners quickly blame any closure, so the loss may have other causes entirely."
    assert f.borne_out(note, BRIDGE, note=True) == (note, 0)
    assert f.borne_out(note, BRIDGE) == ("", 1)


@pytest.mark.parametrize("text, evidence, reason", [
    # each from the demo audited through the page at a6f8bc9 (bench/results/page-audit-verdicts-demo-2026-12-06b.jsonl)
    ("Corroded steel cables", "Engineers replaced 212 corroded steel cables and resurfaced the full deck.", "fewer than"),
    ("Good or bad.", "The council should publish honest results, good or bad.", "fewer than"),
    ("It supports rainfall below average this summer",
     "The service says there is a 70 percent chance that rainfall will be below average this summer.", "what kind"),
    ("Either it bans mobile phones completely from the moment pupils arrive",
     "Either it bans mobile phones completely from the moment pupils arrive, or its pupils fail.", "either/or"),
])
def test_a_fragment_a_claim_about_itself_or_half_a_dilemma_is_no_claim(text, evidence, reason):
    assert reason in f.check_claim(text, evidence, evidence)


def test_a_whole_dilemma_and_a_short_whole_claim_are_claims():
    dilemma = "Either it bans mobile phones completely or its pupils keep failing."
    assert f.check_claim(dilemma, dilemma, dilemma) is None
    assert f.check_claim("Sales tripled this year.", "Sales of Zentra tripled this year.", "Sales of Zentra tripled this "
                         "year.") is None


def test_a_symbol_its_passage_does_not_use_is_garbled():
    assert f.unknown_word("The Clean Motion Alliance, a ❤", BRIDGE) == "❤"
    assert f.unknown_word("Rated ★ by readers", "Rated ★ by readers of the guide.") is None


def test_a_sentence_copied_from_the_middle_of_one_is_cut():
    """From the demo audited at a6f8bc9: a note "afternoons in meetings that achieve nothing. If
    companies trimmed the waste" and "the country. It only mentions that sales have tripled"."""
    note = "the country. It only mentions that sales near the bridge were hurt."
    assert f.borne_out(note, BRIDGE, note=True) == ("It only mentions that sales near the bridge were hurt.", 1)
    assert f.unborne("Engineers replaced 212 corroded steel cables.", BRIDGE) is None


OPINION = ("Greenhill Secondary faces a simple choice. Either it bans mobile phones completely, or its pupils will "
           "keep failing their exams. The governors should vote for the full ban next week.")


def test_a_reflection_sentence_copied_from_its_passage_is_given_back_whole_as_the_passage_s():
    # The demo's writer repeats an opinion piece's sentences as its own (bench/data/demo-notes.labelled.jsonl).
    reflection, cut = f.borne_out("Greenhill Secondary faces a simple choice. The governors should vote for the full "
                                  "ban next", OPINION)
    assert reflection == ('The passage says: "Greenhill Secondary faces a simple choice." The passage says: "The '
                          'governors should vote for the full ban next week."') and cut == 0  # cut short: whole again
    assert f.copied_from("The governors should vote for the full ban next weak.", OPINION) is not None  # one word off
    # Not copies: a sentence that says whose words they are, one in words of its own, a short one.
    assert f.copied_from("The passage says the governors should vote for the full ban next week.", OPINION) is None
    assert f.copied_from("The author wants a ban and gives no evidence that phones cause failure.", OPINION) is None
    assert f.copied_from("A simple choice.", OPINION) is None
    assert f.copied_from("The governors should not vote for the full ban next week.", OPINION) is None  # negated
    # a note may point at the passage's words: the copy rule is the reflection's
    assert f.borne_out("The governors should vote for the full ban next week.", OPINION, note=True)[0] == \
        "The governors should vote for the full ban next week."
    # the same passage sentence twice is said once
    assert f.borne_out("Greenhill Secondary faces a simple choice. Greenhill Secondary faces a simple choice.",
                       OPINION) == ('The passage says: "Greenhill Secondary faces a simple choice."', 1)


def test_a_note_or_sentence_that_vouches_for_its_passage_is_cut_and_doubt_stays():
    for praise, said in (("The passage provides strong evidence and data to support its claims.", "strong evidence"),
                         ("This is a reasonable assumption based on the data.", "reasonable"),
                         ("The passage is well supported by the information provided.", "well supported"),
                         ("The passage provides a balanced view of cyclists.", "balanced"),
                         ("It mentions the sales, which aligns with the information provided.", "aligns with"),
                         # a negation in another clause does not take it back (the demo read on 2026-12-07)
                         ("The pilot had no comparison group, which aligns with the founder's statement.", "aligns with")):
        assert f.vouches(praise) == said
        assert f.unborne(praise, PRESS, note=True) == f"vouches: '{said}'"
    for doubt in ("The figures cannot be considered reliable.", "It is not reasonable to call 24 students proof.",
                  "It is unclear whether the survey is reliable.", "The sample is too small to be reliable.",
                  "The study was small and lasted one afternoon.", "The trial does not align with the claim.",
                  "The figures, the office says, cannot be considered reliable."):
        assert f.vouches(doubt) is None


def test_a_claim_that_starts_inside_a_phrase_of_its_quote_has_the_wrong_subject():
    pools = "Towns with many pools also tend to be wealthier."
    assert f.check_claim("Many pools tend to be wealthier", pools, "A report. " + pools) == \
        "subject left out: its evidence says it of 'towns with ...'"
    # Kept: the quote's own subject, a fronted phrase left out, a specifier left out further on.
    assert f.subject_left_out("Towns with many pools tend to be wealthier", pools) is None
    assert f.subject_left_out("The field hospital had six working ventilators", "During the flooding in Rennick "
                              "last week, the field hospital had six working ventilators and ten patients.") is None
    assert f.subject_left_out("Those figures do not count people who have stopped searching", "Official figures put "
                              "unemployment at 14 percent, but those figures do not count people who have stopped "
                              "searching.") is None
    assert f.subject_left_out("Sales tripled this year.", "Sales of Zentra tripled this year.") is None
    assert f.subject_left_out("Pools make children smarter", pools) is None  # words of its own: other rules'


def test_a_claim_that_calls_itself_a_fact_or_lists_a_field_s_values_is_no_claim():
    forecast = "The service says there is a 70 percent chance that rainfall will be below average this summer."
    written = "The passage supports it by stating that rainfall can be below average during the summer, which is a fact."
    assert f.unwrapped(written) == "Rainfall can be below average during the summer, which is a fact."
    assert f.checked({"claim": written, "evidence": forecast}, forecast)[1].startswith("not a claim")
    assert f.unwrapped("The passage says it rained all week.") == "The passage says it rained all week."
    assert f.defines_its_field("The passage supports the claim that homework is a fact, opinion, value or "
                               "prediction.", "Homework works.") == "fact, opinion, value, prediction"
    assert f.defines_its_field("The forecast is a prediction, not a fact.", "Rain is forecast.") is None
    assert f.defines_its_field("The argument is weak: none of the strong claims are sourced.", "x") is None  # support's
    # a claim's kind named inside it is a claim; only a last clause that classifies it is not
    assert f.not_a_claim("Growth, which is a prediction of the bank, may slow this year.") is None
    assert f.not_a_claim("It is an opinion piece that argues for the ban.") is None


FORECAST = ("The Tarnmoor Meteorological Service says there is a 70 percent chance that rainfall will be below average "
            "this summer. The service noted that its seasonal forecasts have been right about two times in three over "
            "the past decade, and it will update the outlook every month.")
HOSPITAL = ("One family has said their elderly father was passed over because of his age, and they want the scoring "
            "rules made public.")
ALLIANCE = ("Every car sold in the country will be electric by 2030, the Clean Motion Alliance, an industry group funded "
            "by battery makers, declared at its annual conference. The group said falling battery prices made the shift "
            "certain.")


@pytest.mark.parametrize("text, evidence, passage, reason", [
    # the four wrong claims of the demo audited through the page at 1b7c379 (page-audit-verdicts-demo-2026-12-07c)
    ("The forecast is right about two times in three over the past decade, and it will update the outlook every month.",
     FORECAST.split(". ", 1)[1], FORECAST, "attribution dropped: its evidence reports it ('noted')"),
    ("It accepts that its pupils will keep failing their exams.", "or its pupils will keep failing their exams.",
     OPINION, "one branch of its passage's either/or"),
    ("The scoring rules made public are made public.", "and they want the scoring rules made public.", HOSPITAL,
     "garbled: it says 'made public' twice"),
    ("The Clean Motion Alliance, an industry group funded by battery makers, declared at its annual conference.",
     ALLIANCE.split(". ")[0] + ".", ALLIANCE, "says who spoke, not what: 'declared'"),
])
def test_a_claim_that_drops_who_said_it_halves_a_dilemma_garbles_or_reports_nothing_is_dropped(text, evidence,
                                                                                                passage, reason):
    assert reason in f.check_claim(text, evidence, passage)


def test_whose_words_what_was_said_and_a_whole_dilemma_keep_their_claims():
    noted = FORECAST.split(". ", 1)[1]
    assert f.check_claim("The service noted that its seasonal forecasts have been right about two times in three",
                         noted, FORECAST) is None
    assert f.check_claim("The group said falling battery prices made the shift certain.",
                         "The group said falling battery prices made the shift certain.", ALLIANCE) is None
    assert f.check_claim("Every car sold in the country will be electric by 2030, the Clean Motion Alliance declared "
                         "at its annual conference.", ALLIANCE.split(". ")[0] + ".", ALLIANCE) is None
    assert f.check_claim("Either it bans mobile phones completely, or its pupils will keep failing their exams.",
                         "Either it bans mobile phones completely, or its pupils will keep failing their exams.",
                         OPINION) is None
    warned = "Residents warned of flooding on the lower road, the council said."
    assert f.nothing_reported("Residents warned of flooding on the lower road", warned) is None  # what they warned of
    assert f.nothing_reported("The council said.", warned) == "said"
    assert f.nothing_reported("The council said on Monday.", "Roads will close, the council said on Monday.") == "said"
    assert f.nothing_reported("The company said on Monday the plant would close", "The company said on Monday the "
                              "plant would close, and 240 jobs would go.") is None
    assert f.nothing_reported("The passage does not support or refute any claims.", BRIDGE) is None  # the noun


def test_a_reflection_sentence_that_names_a_speaker_and_not_what_was_said_is_cut():
    # from the 1b7c379 demo, rebuilt on cached answers: what was confirmed is the passage's opening, left out
    closure = ("Brightwell Textiles will close its plant in Norbury next March, cutting 340 jobs, the company confirmed "
               "in a letter to staff. Managers blamed rising energy costs and cheaper imports.")
    assert f.borne_out("The company confirmed in a letter to staff. Managers blamed rising energy costs and cheaper "
                       "imports.", closure) == ("Managers blamed rising energy costs and cheaper imports.", 1)
    assert f.said_twice("The reservoir has stood for eighty years and it will stand for eighty more") is None


def test_a_text_the_schema_s_length_bound_stopped_loses_its_unfinished_last_sentence():
    """From the demos of 2026-12-07: a reflection stopped at its 300 characters ending "... set aside.
    The Norbury" (a name, so no word-based rule saw it was cut)."""
    closure = ("The Norbury ceramics plant will close in March with the loss of 240 jobs. The company said it would "
               "offer retraining funds, but did not say how much money had been set aside.")
    whole = ("The passage reports a plant closure and the jobs lost, with the company's plan for retraining funds. "
             "The company said it would offer retraining funds, but did not say how much money had been set aside.")
    bound = f.length_bounds()["reflection"]
    stopped = (whole + " The plant closure means jobs lost in the town of Norbury, and the company gives no figure"
               " for the funds. The Norbury")[:bound]
    assert len(stopped) >= f.BOUND_SHARE * bound and f.stopped_at_bound(stopped, bound)
    kept, cut = f.borne_out(stopped, closure, bound=bound)
    assert not kept.endswith("Norbury") and cut >= 1
    assert f.borne_out(whole, closure, bound=bound) == f.borne_out(whole, closure)  # finished: as without the bound
    assert not f.stopped_at_bound("The company did not say how much", bound)  # short: not the bound's doing
    assert f.length_bounds() == {"reflection": 300, "weak_reasoning": 120, "uncertainties": 120, "ethical_stakes": 120}


def test_a_reflection_sentence_in_the_authors_first_person_is_cut_but_a_note_or_a_quotation_keeps_it():
    # the demo read through the page on 2026-12-07: "... most parents I know support it" as the reflection's own
    homework = ("Some parents want homework banned at Linwood Primary. They are wrong. Almost every school in the "
                "country sets homework, and most parents I know support it, so it clearly works.")
    assert f.unborne("It clearly works, and most parents I know support it.", homework) == (
        "first person: 'i' is the author's voice, taken over")
    assert f.unborne("Most parents I know support it, so it clearly works.", homework, note=True) is None  # a note may
    assert f.speaks_as_author('The author writes "most parents I know support it" and gives no survey.') is None
    rant = ("Last Tuesday a cyclist shot through a red light on Mill Street and nearly knocked me over. That tells "
            "you everything you need to know about cyclists in this city.")
    kept, cut = f.borne_out("The cyclist nearly knocked me over, so cyclists are dangerous. Last Tuesday a cyclist "
                            "shot through a red light on Mill Street and nearly knocked me over.", rant)
    assert kept == f.attributed(rant.split(". ")[0] + ".") and cut == 1  # a copy is the passage's, whoever speaks
