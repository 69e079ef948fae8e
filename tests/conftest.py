import json
import os
from pathlib import Path

import pytest

from builder.backends.base import Backend
from builder.resources import EXAMPLES_DIR

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs one worker a core), each worker is pinned to a core of
    its own, and everything it starts (llama-server, torch, a Ray node, Chromium) inherits that:
    engines told "all cores" take the one core (builder.backends.base.usable_cores). Two
    one-thread engines side by side answer about 1.5 times as fast as one two-thread engine on
    these 2 cores (llama.cpp's threads scale poorly), where two two-thread engines would spin
    against each other."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw"):
        # A worker starts with COLUMNS=80 in its environment, which rich's consoles would keep
        # for good at import: tests that widen the console (CliRunner(env={"COLUMNS": ...})) could not.
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
    if worker.startswith("gw") and workers > 1 and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) >= workers:
            try:
                os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})
            except OSError:  # a sandbox that forbids it: the workers share the cores unpinned
                pass


class TextBackend(Backend):
    """Base of the scripted test backends: the prompt is its messages' contents, one word a token."""

    kind = "scripted"

    def render(self, messages):
        return "\n".join(m["content"] for m in messages)

    def count_tokens(self, text):
        return len(text.split())


def engine_config(**keys):
    """An engine config as a TOML table would give it (the registry picks the class by `backend`)."""
    from builder.backends import registry

    return registry.parse(keys)


# Tests that are not about the ensemble use one member (named like the model, as before the
# ensemble existed) and no critics: the default ensemble runs three members.
ONE_MEMBER = {"k": 0, "members": [{"name": "smollm2", "persona": "default"}]}


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def write_workspace(root: Path, corpus_rows: list[str] | None = None, **sections) -> Path:
    """A workspace with a JSONL corpus and a config whose sections are overridden by kwargs
    (one-member ensemble unless `ensemble` is given)."""
    sections.setdefault("ensemble", ONE_MEMBER)
    # Tests of other features than faithfulness run SmolLM2-135M without the faithfulness gates:
    # it passes them on about 1 passage in 8 (bench/annotators.py), which would leave those tests
    # nothing to compile. The gates on real models: tests/stages/test_faithful_build.py.
    sections["annotate"] = {"gates": False, **sections.get("annotate", {})}
    # One slot per core a server may use (`slots = 0`), where the default is 4: a test worker is pinned
    # to one core, where one slot decodes about 1.3 times as fast as four (bench/engines.py, docs/engines.md).
    annotator = sections.get("annotator", {})
    if annotator.get("backend", "auto") in ("auto", "llama_server"):
        sections["annotator"] = {"slots": 0, **annotator}
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus").mkdir(exist_ok=True)
    if corpus_rows is not None:
        with open(root / "corpus" / "c.jsonl", "w", encoding="utf-8") as fh:
            for text in corpus_rows:
                fh.write(json.dumps({"text": text}) + "\n")
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    (root / "ratchet.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def smollm2():
    from builder.backends.llama_cpp import LlamaCppBackend
    from builder.models import resolve_model

    backend = LlamaCppBackend(resolve_model("bundled:smollm2"), n_ctx=2048)
    yield backend
    backend.close()


SHORT_PASSAGES = [
    "The city council says the new bridge cut commuting times by 40 percent, but it has published no data.",
    "Everyone I know loves the new phone, so it must be the best phone ever made.",
    "A hospital must decide whether to give its last ventilator to the youngest patient or the sickest one.",
    "Analysts predict that electric cars will outsell petrol cars within five years.",
]


def built_once(tmp_path_factory, name: str, make):
    """A session's real build, made once for the whole run: `make(root)` builds a workspace at
    root and returns its summary. Under pytest-xdist the first worker to ask builds it in the
    run's shared temporary folder, under a lock, and the others wait for it; every worker then
    gets a copy of its own, so a test that writes into its workspace never changes another
    worker's (a workspace holds no absolute path of its own: copies build and rebuild alike)."""
    import pickle
    import shutil

    from filelock import FileLock

    from builder.workspace import Workspace

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    shared = tmp_path_factory.getbasetemp().parent / f"shared-{name}" if worker else tmp_path_factory.mktemp(name)
    summary_file = shared / "summary.pickle"
    with FileLock(str(shared) + ".lock"):
        if not summary_file.exists():
            shared.mkdir(parents=True, exist_ok=True)
            summary = make(shared / "ws")
            summary_file.write_bytes(pickle.dumps(summary))
    if not worker:
        return Workspace(shared / "ws"), pickle.loads(summary_file.read_bytes())
    root = tmp_path_factory.mktemp(name) / "ws"
    shutil.copytree(shared / "ws", root)
    return Workspace(root), pickle.loads(summary_file.read_bytes())


def _build(root) -> dict:
    from builder.build import run_build
    from builder.workspace import Workspace

    return run_build(Workspace(root))


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """One real build on the bundled model, shared by the tests that read its outputs."""
    def make(root):
        rows = SHORT_PASSAGES + [SHORT_PASSAGES[0], "   "]  # a duplicate and an empty record
        # the model auditor is off by default (none earns it); this build tests its path on the real model
        write_workspace(root, rows, sampling={"max_tokens": 384}, audit={"auditor": "bundled:smollm2"})
        return _build(root)

    return built_once(tmp_path_factory, "built", make)


@pytest.fixture(scope="session")
def hf_smollm2():
    """SmolLM2 exported from its GGUF to a transformers checkpoint: the model cache's, which
    `ratchet train` copies too (one export per machine). Tests read it and never write into it."""
    from builder.models import exported, resolve_model

    return exported(resolve_model("bundled:smollm2"))


@pytest.fixture(scope="session")
def smollm2_two_blocks(hf_smollm2, tmp_path_factory):
    """SmolLM2 cut to its embeddings and the first 2 of its 30 transformer blocks (about 30M
    parameters, most of them the embedding), with its own tokenizer: a real checkpoint that
    trains, scores and generates faster (the capability experiment's test: 52 s -> 15 s). The
    experiments' end-to-end tests run on it: their claims are about arms, pairing, seeds and
    reuse, not about what SmolLM2 learns. The whole model is trained in tests/test_train.py (the
    loop) and tests/test_trl.py."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.getbasetemp() / "smollm2-two-blocks"
    model = AutoModelForCausalLM.from_pretrained(str(hf_smollm2), dtype=torch.float32)
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(str(out), safe_serialization=True)
    for path in hf_smollm2.iterdir():
        if path.suffix != ".safetensors" and path.name != "config.json":
            shutil.copy2(path, out / path.name)
    return out


@pytest.fixture(scope="session")
def hf_tokenizer(hf_smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_smollm2))

SCENARIO = EXAMPLES_DIR / "code_hacking" / "scenario.jsonl"
# Lines of the scenario file. The bundled 135M judge is weak (docs/conscience-and-consent.md)
# and keeps few rewrites, so these lines were picked from a full run of the scenario (calibrated
# judgements, edit-style free-text rewrites and the pair checks, the in-process engine) to hold
# responses it calls ethical (15, 37), an unethical one whose rewrite is not kept (2), a pair
# both checkpoints let through although SmolLM2 leans "no" (11: P(no) 0.57 under the test's
# veto_threshold 0.6, a drift event) and a pair it vetoes (25: P(no) 0.74); line 33 is held out
# (split = "heldout") and must never be judged. (Line 40's rewrite repeats the rejected code
# under new prose: the `differs` check drops it.)
LINES = [2, 11, 15, 25, 33, 37]


def scenario_rows(lines):
    rows = SCENARIO.read_text(encoding="utf-8").splitlines()
    return [json.loads(rows[n - 1]) for n in lines]


def conscience_workspace(root, lines=LINES, **sections):
    # Pinned to the in-process engine: the assertions below rely on its exact outputs (the
    # managed llama-server decodes differently, see README "Engines").
    sections = {"sampling": {"max_tokens": 384}, "audit": {"rate": 0.0}, "annotator": {"backend": "llama_cpp"},
                "conscience": {"items": "items.jsonl", "exclude": {"split": "heldout"}},
                "consent": {"judges": ["bundled:smollm2", "bundled:gemma3"], "veto_threshold": 0.6,
                            "explored": ["vetoed", "rejected"]}, **sections}
    write_workspace(root, SHORT_PASSAGES[:2], **sections)
    with open(root / "items.jsonl", "w", encoding="utf-8") as fh:
        for row in scenario_rows(lines):
            fh.write(json.dumps(row) + "\n")
    from builder.workspace import Workspace

    return Workspace(root)


def median_confidence(ws, sql: str) -> float:
    """The median of the distinct confidences (the likeliest value's probability) that a real
    build's judge showed, `sql` selecting the deciding distributions: a threshold nobody picked,
    so that judgements fall on both sides of it whatever they were."""
    import statistics

    con = ws.connect(read_only=True)
    confidence = sorted({round(max(json.loads(p).values()), 4) for (p,) in con.execute(sql).fetchall()})
    con.close()
    threshold = statistics.median(confidence)
    assert len(confidence) >= 2 and threshold > 0.5, confidence
    return threshold


@pytest.fixture(scope="session")
def conscience_built(tmp_path_factory):
    """One real build of the code-hacking items (conscience and consent on, explored split kept),
    shared by the tests that read its outputs."""
    return built_once(tmp_path_factory, "conscience", lambda root: _build(conscience_workspace(root).root))
