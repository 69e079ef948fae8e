"""The audit page's checks of a submitted form, said in the auditor's words (the browser checks
the same before sending; these are the server's, for a form sent without the page's script)."""
from builder.web.app import REASON_LENGTH, form_problem


def test_a_reflection_verdict_is_pass_or_fail_and_a_pass_names_no_wrong_claim():
    assert form_problem("pass", [], "", 2) is None
    assert form_problem("fail", ["2"], "", 2) is None
    assert form_problem("right", [], "", 2) == "Choose Pass or Fail."
    assert form_problem("pass", ["1"], "", 2) == "A pass names no wrong claim: untick the claims or choose Fail."
    assert form_problem("fail", ["3"], "", 2) == "Wrong claims are numbered 1 to 2."


def test_a_critique_verdict_is_right_or_wrong_and_right_names_no_claim_the_critic_got_wrong():
    assert form_problem("right", [], "", 2, critique=True) is None
    assert form_problem("wrong", ["1", "2"], "", 2, critique=True) is None
    assert form_problem("wrong", [], "", 2, critique=True) is None  # wrong on the whole, every claim's verdict fair
    assert form_problem("pass", [], "", 2, critique=True) == "Choose Right or Wrong."
    assert form_problem("right", ["1"], "", 2, critique=True) == ("Right names no claim the critic got wrong: untick the "
                                                                  "claims or choose Wrong.")
    assert form_problem("wrong", ["3"], "", 2, critique=True) == "Claims are numbered 1 to 2."
    low, high = REASON_LENGTH
    assert form_problem("wrong", [], "x" * (high + 1), 2, critique=True).startswith(f"A reason is {low} to {high}")
