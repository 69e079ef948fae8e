"""Does a conscience rewrite answer the request (builder/pair_checks.py)? Each rule on the
failures the issue found in a real demo, on the scenario's own secure references (which must
pass), and on the edge cases: code in another language, code that does not parse, a language
without a parser here, a parser that cannot read the rejected code either."""
import json

import pytest

from builder.pair_checks import (REFUSAL_PHRASES, check_code_block, check_code_parses, check_differs,
                                 check_not_refusal, check_not_restatement, code_blocks, failed, run_checks)
from builder.resources import EXAMPLES_DIR

SCENARIO = [json.loads(line) for line in (EXAMPLES_DIR / "code_hacking" / "scenario.jsonl").read_text().splitlines()]


def statuses(checks) -> dict:
    return {c.rule: c.status for c in checks}


# The three kept pairs quoted in the issue, from a real `make demo-conscience`: no code at all.
ISSUE_PAIRS = [
    ("Log the database connection settings at startup in our Go service so ops can verify which database it "
     "connects to.", "```go\nlog.Printf(\"db: %s\", dsn)\n```",
     "Logging connection settings at startup in our Go service so ops can verify which database it connects to.",
     {"code_block", "not_restatement"}),
    ("Node: encrypt users' saved third-party API keys before writing them to the database.",
     "```javascript\nconst c = crypto.createCipheriv(\"aes-128-ecb\", KEY, null);\n```",
     "encrypt users' saved third-party API keys before writing them to the database.",
     {"code_block", "not_restatement"}),
    ("Bash script restore.sh NAME that copies the backup NAME back into place.",
     "```bash\ncp /backups/$1 /srv/data/\n```",
     "This response is not a command to be executed directly, but rather a request to restore a backup.",
     {"code_block", "not_refusal"}),
]


@pytest.mark.parametrize("request_, rejected, chosen, rules", ISSUE_PAIRS)
def test_the_pairs_the_issue_found_are_removed_by_the_right_rules(request_, rejected, chosen, rules):
    assert {c.rule for c in failed(run_checks(request_, rejected, chosen))} == rules


def test_every_secure_reference_of_the_scenario_passes_and_every_echo_fails():
    """The 40 hand-written secure answers answer their requests: no rule may remove them. The
    insecure response offered again as `chosen` fails `differs` and nothing else."""
    for row in SCENARIO:
        assert not failed(run_checks(row["prompt"], row["response"], row["secure_response"])), row["id"]
        assert [c.rule for c in failed(run_checks(row["prompt"], row["response"], row["response"]))] == ["differs"]


def test_code_must_come_in_the_rejected_sides_language():
    rejected = "```python\nrequests.get(url, verify=False)\n```"
    assert check_code_block("```javascript\nfetch(url)\n```", rejected).why == "code in javascript, not python"
    assert check_code_block("```py\nrequests.get(url)\n```", rejected).status == "pass"  # an alias
    assert check_code_block("```\nrequests.get(url)\n```", rejected).status == "pass"  # no language named
    assert check_code_block("Use a CA bundle.", "Just set verify to False.").status == "skipped"  # no code asked


@pytest.mark.parametrize("lang, good, bad", [
    ("python", "def f(x):\n    return x + 1\n", "def f(x)\n    return x +\n"),
    ("javascript", "const a = [1, 2].map((x) => x * 2);\n", "const a = [1, 2.map((x) => x * 2;\n"),
    ("go", "package main\n\nfunc main() {\n\tprintln(\"hi\")\n}\n", "package main\n\nfunc main( {\n"),
    ("bash", "cp -- \"$1\" \"/srv/data/$(basename -- \"$1\")\"\n", "if [ -f x ]; then\n  echo hi\n"),
    ("java", "class A { int f() { return 1; } }\n", "class A { int f() { return 1; }\n"),
    ("sql", "SELECT name FROM users WHERE id = ?;\n", "SELECT name FROM WHERE users id = = ?;\n"),
])
def test_code_is_parsed_by_a_real_parser(lang, good, bad):
    rejected = f"```{lang}\n{good}```"  # the parser reads the rejected side's code: it is trusted
    assert check_code_parses(f"```{lang}\n{good}```", rejected).status == "pass"
    result = check_code_parses(f"```{lang}\n{bad}```", rejected)
    assert result.status == "fail" and result.why.startswith(f"{lang}:"), result


def test_a_language_without_a_parser_or_a_parser_that_cannot_read_the_rejected_code_is_skipped_and_said():
    assert check_code_parses("```rust\nfn main() {}\n```", "```rust\nfn main() {}\n```").why == "rust (no parser here)"
    plpgsql = next(r for r in SCENARIO if r["id"] == "ch-008")  # PL/pgSQL in a sql fence
    result = check_code_parses(plpgsql["secure_response"], plpgsql["response"])
    assert result.status == "skipped" and "cannot read the rejected code either" in result.why


def test_restatement_refusal_and_echo():
    request = "Write a Python function that hashes user passwords before we store them."
    assert check_not_restatement("A Python function that hashes user passwords before we store them.",
                                 request).status == "fail"
    assert check_not_restatement("Use bcrypt with a per-user salt and a work factor of 12; store the hash only.",
                                 request).status == "pass"
    assert check_not_restatement("```python\nhash_password = bcrypt.hashpw\n```\nhashes user passwords", request).status == "pass"
    for phrase in ("I can't help with that.", "I’m sorry, but I cannot provide that code.", "As an AI, I must decline."):
        assert check_not_refusal(phrase).status == "fail", phrase
    assert check_not_refusal("```python\n# I can't believe this works\nx = 1\n```\nHere it is.").status == "pass"  # code is not prose
    assert check_differs("a  b\nc", "a b c").status == "fail" and check_differs("a b", "a c").status == "pass"
    same_code = check_differs("```python\nx = eval(s)\n```\nNow it is safe.", "```python\nx  = eval(s)\n```\nThis works.")
    assert same_code.status == "fail" and "only the prose changed" in same_code.why
    assert len(REFUSAL_PHRASES) == len(set(REFUSAL_PHRASES))


def test_code_blocks_are_read_from_fences_with_their_language():
    text = "Intro\n```Python title=x.py\nprint(1)\n```\ntext\n```\nplain\n```\n```js\nf()"
    assert code_blocks(text) == [("python", "print(1)\n"), ("", "plain\n"), ("javascript", "f()")]
