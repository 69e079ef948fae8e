"""Prompt templates live in prompts/ (jinja2) so users edit them without touching code.

The passage is data, never instructions: it is wrapped in fixed delimiters and datamarked
(Microsoft's "spotlighting"), and backends tokenize message content without special tokens,
so `<|im_end|>` in a passage stays plain text. Datamarking modes:
  line  every line of the passage starts with "| " (default: words keep their tokens)
  word  every space is replaced by "ˆ" (the paper's variant; it splits a small model's
        tokens mid-word and SmolLM2-135M then copies fragments like "thecouncil")
  none  delimiters only
"""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from .corpus import jsonl_lines
from .resources import PROMPTS_DIR

WORD_MARK = "\u02c6"  # ˆ : rare in prose, visibly not a space
LINE_MARK = "| "
OPEN, CLOSE = "<<<PASSAGE", "PASSAGE>>>"
_SPACES = re.compile(r"[ \t]+")
_LINE_MARKS = re.compile(r"(^|\n)\| ")


def datamark(text: str, mode: str = "line") -> str:
    if mode == "word":
        return _SPACES.sub(WORD_MARK, text)
    if mode == "line":
        return "\n".join(LINE_MARK + line for line in text.split("\n"))
    return text


def unmark(value):
    """Undo datamarking in everything a model wrote (it often copies the marks)."""
    if isinstance(value, str):
        return _LINE_MARKS.sub(r"\1", value.replace(WORD_MARK, " "))
    if isinstance(value, list):
        return [unmark(v) for v in value]
    if isinstance(value, dict):
        return {k: unmark(v) for k, v in value.items()}
    return value


def annotation_limits() -> dict[str, int]:
    """The schema's string bounds, told to the annotator so that it writes within them instead of
    being cut mid-word by the grammar (schemas/annotation.schema.json is the one source)."""
    from .resources import load_schema

    props = load_schema("annotation")["properties"]
    claim = props["claims"]["items"]["properties"]
    return {"claim": claim["claim"]["maxLength"], "note": props["weak_reasoning"]["items"]["maxLength"], "reflection": props["reflection"]["maxLength"]}


class PromptError(Exception):
    """A prompt file that is missing or broken; the message names it."""


class Prompts:
    """The prompt set of a workspace: an override folder first, then the built-in prompts/."""

    def __init__(self, override: Path | None = None):
        folders = [str(override)] if override else []
        self.folders = [Path(f) for f in folders] + [PROMPTS_DIR]
        # Templates come from the workspace (annotate.prompts): rendered sandboxed, so a template
        # cannot reach Python objects beyond the values it is given.
        self.env = SandboxedEnvironment(
            loader=jinja2.FileSystemLoader([str(f) for f in self.folders]),
            undefined=jinja2.StrictUndefined, keep_trailing_newline=False, autoescape=False)

    def _source(self, name: str) -> str:
        return self.env.loader.get_source(self.env, name)[0]

    def render(self, name: str, **values) -> str:
        try:
            return self.env.get_template(name).render(**values).strip()
        except SecurityError as exc:
            raise PromptError(f"{name}: the template tried something a prompt template may not ({exc})") from None

    @property
    def audit_notice(self) -> str:
        return self._source("audit_notice.txt").strip()

    def _jsonl(self, name: str) -> list[dict]:
        return [json.loads(line) for line in jsonl_lines(self._source(name)) if line.strip()]

    def jsonl_rows(self, name: str) -> list[dict]:
        """The rows of a JSONL file beside the prompts; none when no folder has it."""
        try:
            return self._jsonl(name)
        except jinja2.TemplateNotFound:
            return []

    @cached_property
    def examples(self) -> list[dict]:
        """Few-shot examples (annotate.examples.jsonl): a tiny model copies their format."""
        return self._jsonl("annotate.examples.jsonl")

    def persona(self, name: str) -> str:
        """The text of personas/NAME.txt; "default" is the empty persona."""
        try:
            return self._source(f"personas/{name}.txt").strip()
        except jinja2.TemplateNotFound:
            known = sorted(p.stem for f in self.folders for p in (f / "personas").glob("*.txt"))
            raise PromptError(f"persona '{name}': no file personas/{name}.txt in {', '.join(map(str, self.folders))} "
                              f"(known: {', '.join(dict.fromkeys(known))})") from None

    def annotation_messages(self, passage: str, mark: str = "line", persona: str = "default",
                            examples: bool = True) -> tuple[dict, ...]:
        """System, the examples as earlier turns (unless `examples` is false), then the passage:
        everything before the passage is identical across calls, so the engine reuses its
        evaluated prefix."""
        values = {"open": OPEN, "close": CLOSE, "mark": mark, "line_mark": LINE_MARK, "word_mark": WORD_MARK,
                  "audit_notice": self.audit_notice, "limits": annotation_limits()}
        system = self.render("annotate.system.jinja", persona=self.persona(persona), **values)
        messages = [{"role": "system", "content": system}]
        for example in self.examples if examples else []:
            messages.append({"role": "user", "content": self.render(
                "annotate.user.jinja", passage=datamark(example["passage"], mark), **values)})
            messages.append({"role": "assistant", "content": json.dumps(example["annotation"], ensure_ascii=False)})
        messages.append({"role": "user", "content": self.render("annotate.user.jinja", passage=datamark(passage, mark), **values)})
        return tuple(messages)

    def reprose_messages(self, passage: str, answer: dict, mark: str = "line", persona: str = "default",
                         examples: bool = True) -> tuple[dict, ...]:
        """The annotation's own conversation (the same prefix, which the engine has evaluated),
        the writer's answer as its turn, then the request for the reflection alone again
        (annotate.reprose.jinja): nothing of the passage is in the new turn."""
        return (*self.annotation_messages(passage, mark, persona, examples),
                {"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)},
                {"role": "user", "content": self.render("annotate.reprose.jinja", limits=annotation_limits())})

    @cached_property
    def rewrite_examples(self) -> list[dict]:
        """Few-shot edits for the conscience rewrite (rewrite.examples.jsonl): prompt, response,
        rewrite. Written for the purpose: no scenario item (held out or measured) is among them."""
        return self._jsonl("rewrite.examples.jsonl")

    @cached_property
    def critique_examples(self) -> list[dict]:
        return self._jsonl("critique.examples.jsonl")

    def critique_messages(self, passage: str, record: dict, persona: str = "default") -> tuple[dict, ...]:
        """The critic sees the passage and the annotation, never who wrote it. Passages are
        always line-marked here: the critic must tell the passage from the annotation."""
        values = {"open": OPEN, "close": CLOSE, "line_mark": LINE_MARK, "audit_notice": self.audit_notice}
        messages = [{"role": "system", "content": self.render("critique.system.jinja", persona=self.persona(persona), **values)}]
        for example in self.critique_examples:
            messages.append({"role": "user", "content": self.render(
                "critique.user.jinja", passage=datamark(example["passage"], "line"), **values, **example["annotation"])})
            messages.append({"role": "assistant", "content": json.dumps(example["critique"], ensure_ascii=False)})
        messages.append({"role": "user", "content": self.render(
            "critique.user.jinja", passage=datamark(passage, "line"), **values, **record)})
        return tuple(messages)

    def compare_messages(self, passage: str, a: dict, b: dict, persona: str = "default") -> tuple[dict, ...]:
        """A panel member compares two reflections of one passage (the ratchet's pairwise test);
        it never learns which is the parent and which the candidate."""
        values = {"open": OPEN, "close": CLOSE, "line_mark": LINE_MARK, "audit_notice": self.audit_notice}
        return ({"role": "system", "content": self.render("compare.system.jinja", persona=self.persona(persona), **values)},
                {"role": "user", "content": self.render("compare.user.jinja", passage=datamark(passage, "line"), a=a, b=b,
                                                        **values)})

    @cached_property
    def consent_examples(self) -> list[dict]:
        return self._jsonl("consent.examples.jsonl")

    def _consent_turn(self, context: str, context_text: str, target: str, target_text: str) -> dict:
        return {"role": "user", "content": self.render(
            "consent.user.jinja", open_context=f"<<<{context}", close_context=f"{context}>>>",
            context_text=datamark(context_text, "line"), open_target=f"<<<{target}", close_target=f"{target}>>>",
            target_text=datamark(target_text, "line"))}

    def consent_messages(self, context: str, context_text: str, target: str, target_text: str) -> tuple[dict, ...]:
        """A frozen judge asked to consent to one training example: what the model sees
        (context: REQUEST or PASSAGE) and what it would learn to write (target: RESPONSE or
        REFLECTION), both line-marked data. The shared instructions and examples come first."""
        messages = [{"role": "system", "content": self.render("consent.system.jinja", line_mark=LINE_MARK)}]
        for ex in self.consent_examples:
            messages.append(self._consent_turn(ex["context"], ex["context_text"], ex["target"], ex["target_text"]))
            messages.append({"role": "assistant", "content": json.dumps(ex["answer"], ensure_ascii=False)})
        messages.append(self._consent_turn(context, context_text, target, target_text))
        return tuple(messages)

    def reflection(self, record: dict) -> str:
        return self.render("reflection.jinja", **record)

    def hashes(self, personas: Sequence[str] = ()) -> dict:
        names = ["audit_notice.txt", "annotate.system.jinja", "annotate.user.jinja", "annotate.examples.jsonl",
                 "annotate.reprose.jinja",
                 "critique.system.jinja", "critique.user.jinja", "critique.examples.jsonl", "reflection.jinja",
                 "consent.system.jinja", "consent.user.jinja", "consent.examples.jsonl",
                 "compare.system.jinja", "compare.user.jinja", "rewrite.examples.jsonl",
                 *(f"personas/{p}.txt" for p in sorted(set(personas)))]
        return {n: hashlib.sha256(self._source(n).encode()).hexdigest() for n in names}
