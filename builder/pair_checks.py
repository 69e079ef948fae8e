"""Does a conscience rewrite answer the request? Deterministic checks on the `chosen` side of a
DPO pair, run after the frozen judge has called it ethical.

A small judge calls almost anything harmless "ethical", including a rewrite that restates the
request, refuses it, or drops the code that was asked for. A DPO pair built on such a `chosen`
teaches the model to stop helping. So every rule below must pass for a pair to be kept; each
returns a Check whose status is "pass", "fail" (with why) or "skipped" (with why it could not
run), and the pairs table and the dpo split keep every result.

Rules, in order:
  code_block     the rejected response holds a fenced code block (the request asked for code):
                 the chosen holds one too, in the same language (a fence without a language
                 matches any); skipped when the rejected response holds no code.
  code_parses    every code block of the chosen in a language with a parser here parses:
                 Python with `ast`, JavaScript, TypeScript, Go, Bash, Java and SQL with
                 tree-sitter grammars; another language is skipped, named.
  not_restatement  a chosen without code is not the request said back: fewer than
                 RESTATEMENT_SHARE of its distinct words (at least RESTATEMENT_MIN_WORDS) come
                 from the request.
  not_refusal    the chosen's prose holds none of REFUSAL_PHRASES (a documented phrase list,
                 not a classifier: small, inspectable, and what these small models write).
  differs        the chosen is not the rejected response again, nor its code blocks again under
                 other prose (whitespace normalised).
"""
from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass
from functools import cache

FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
LANGUAGE_ALIASES = {"py": "python", "python3": "python", "js": "javascript", "node": "javascript", "jsx": "javascript",
                    "mjs": "javascript", "ts": "typescript", "tsx": "typescript", "golang": "go", "sh": "bash",
                    "shell": "bash", "zsh": "bash", "console": "bash", "postgresql": "sql", "postgres": "sql",
                    "mysql": "sql", "sqlite": "sql", "psql": "sql", "txt": "text", "plaintext": "text", "plain": "text"}
# A block that is not code in a language (a requirements file, a log): it answers for any language.
NEUTRAL = {"", "text"}
# tree-sitter grammar module and the function giving its language, per language name
TREE_SITTER = {"javascript": ("tree_sitter_javascript", "language"), "go": ("tree_sitter_go", "language"),
               "bash": ("tree_sitter_bash", "language"), "java": ("tree_sitter_java", "language"),
               "typescript": ("tree_sitter_typescript", "language_typescript"), "sql": ("tree_sitter_sql", "language")}
RULES = ("code_block", "code_parses", "not_restatement", "not_refusal", "differs")
RESTATEMENT_SHARE = 0.7
RESTATEMENT_MIN_WORDS = 5
REFUSAL_PHRASES = ("i can't", "i cannot", "i can not", "i won't", "i will not", "i'm sorry", "i am sorry",
                   "i apologize", "as an ai", "i'm unable", "i am unable", "i'm not able", "i am not able",
                   "unable to help", "can't help with", "cannot help with", "cannot assist", "can't assist",
                   "i must decline", "i decline", "not able to provide", "cannot provide", "can't provide",
                   "is not a command to be executed", "not appropriate for me")
_WORD = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Check:
    rule: str
    status: str  # pass | fail | skipped
    why: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def language(tag: str) -> str:
    tag = tag.strip().lower()
    return LANGUAGE_ALIASES.get(tag, tag)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """Fenced code blocks as (language, code); the language is "" where the fence names none."""
    return [(language(lang), code) for lang, code in FENCE.findall(text or "")]


def prose(text: str) -> str:
    """The text outside its code blocks."""
    return FENCE.sub(" ", text or "")


def words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def check_code_block(chosen: str, rejected: str) -> Check:
    wanted = code_blocks(rejected)
    if not wanted:
        return Check("code_block", "skipped", "the rejected response holds no code block")
    lang = next((lang for lang, _ in wanted if lang), "")
    got = code_blocks(chosen)
    if not got:
        return Check("code_block", "fail", f"no code block, where the rejected response answered with "
                                           f"{lang or 'code'}")
    if lang and not any(g == lang or g in NEUTRAL for g, _ in got):
        return Check("code_block", "fail", f"code in {', '.join(sorted({g for g, _ in got}))}, not {lang}")
    return Check("code_block", "pass")


@cache
def _parser(lang: str):
    import importlib

    import tree_sitter

    module, fn = TREE_SITTER[lang]
    return tree_sitter.Parser(tree_sitter.Language(getattr(importlib.import_module(module), fn)()))


def parse_error(lang: str, code: str) -> str | None:
    """None when `code` parses as `lang`, else what is wrong. KeyError: no parser for `lang`."""
    if lang == "python":
        try:
            ast.parse(code)
        except SyntaxError as exc:
            return f"python: {exc.msg} (line {exc.lineno})"
        return None
    tree = _parser(lang).parse(code.encode("utf-8"))
    if not tree.root_node.has_error:
        return None
    bad = _first_error(tree.root_node)
    return f"{lang}: syntax error at line {bad.start_point[0] + 1}" if bad else f"{lang}: syntax error"


def _first_error(node):
    if node.type == "ERROR" or node.is_missing:
        return node
    for child in node.children:
        found = _first_error(child) if child.has_error or child.is_missing else None
        if found is not None:
            return found
    return None


def parsable(lang: str) -> bool:
    return lang == "python" or lang in TREE_SITTER


def check_code_parses(chosen: str, rejected: str) -> Check:
    """A parser is trusted for a language only if it reads the rejected response's code in that
    language: PL/pgSQL inside a SQL fence, say, is beyond tree-sitter-sql, and a failure there
    would say nothing about the rewrite. An unnamed fence is in the rejected side's language."""
    default = next((lang for lang, _ in code_blocks(rejected) if lang not in NEUTRAL), "")

    def in_a_language(text: str) -> list[tuple[str, str]]:
        return [(lang or default, code) for lang, code in code_blocks(text) if lang != "text"]

    blocks = in_a_language(chosen)
    if not blocks:
        return Check("code_parses", "skipped", "no code block in a language")
    unreadable = {lang for lang, code in in_a_language(rejected) if parsable(lang) and parse_error(lang, code)}
    checked = [(lang, code) for lang, code in blocks if parsable(lang) and lang not in unreadable]
    errors = [e for lang, code in checked if (e := parse_error(lang, code))]
    if errors:
        return Check("code_parses", "fail", errors[0])
    skipped = sorted({lang or "unnamed" for lang, _ in blocks} - {lang for lang, _ in checked})
    if not checked:
        return Check("code_parses", "skipped", ", ".join(
            f"{lang} (the parser cannot read the rejected code either)" if lang in unreadable
            else f"{lang} (no parser here)" for lang in skipped))
    return Check("code_parses", "pass", f"not checked: {', '.join(skipped)}" if skipped else "")


def check_not_restatement(chosen: str, request: str) -> Check:
    if code_blocks(chosen):
        return Check("not_restatement", "pass", "holds code")
    mine = words(prose(chosen))
    if len(mine) < RESTATEMENT_MIN_WORDS:
        return Check("not_restatement", "fail", f"{len(mine)} distinct word(s) and no code")
    share = len(mine & words(request)) / len(mine)
    if share >= RESTATEMENT_SHARE:
        return Check("not_restatement", "fail", f"{share:.0%} of its words are the request's, and no code")
    return Check("not_restatement", "pass")


def check_not_refusal(chosen: str) -> Check:
    text = " ".join(prose(chosen).lower().replace("\u2019", "'").split())
    found = next((p for p in REFUSAL_PHRASES if p in text), None)
    return Check("not_refusal", "fail", f"refuses ({found!r})") if found else Check("not_refusal", "pass")


def check_differs(chosen: str, rejected: str) -> Check:
    """Not the rejected response again, and not its code again under new prose."""
    def norm(text: str) -> str:
        return " ".join(text.split())

    if norm(chosen) == norm(rejected):
        return Check("differs", "fail", "identical to the rejected response")
    code = [norm(c) for _, c in code_blocks(chosen)]
    if code and code == [norm(c) for _, c in code_blocks(rejected)]:
        return Check("differs", "fail", "the rejected response's code again, only the prose changed")
    return Check("differs", "pass")


def run_checks(request: str, rejected: str, chosen: str) -> list[Check]:
    """Every rule on one pair, in the documented order."""
    return [check_code_block(chosen, rejected), check_code_parses(chosen, rejected),
            check_not_restatement(chosen, request), check_not_refusal(chosen), check_differs(chosen, rejected)]


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status == "fail"]
