"""`ratchet experiment capability` end to end on a tiny budget (the bundled SmolLM2, one
training step per arm, a dozen items), its bookkeeping, and its refusals."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.experiments.capability import (BUNDLED_ITEMS, ExperimentError, control_dataset, experiment_dir,
                                            load_items)
from builder.workspace import Workspace

from .conftest import toml_value


def test_the_bundled_items_are_a_valid_multiple_choice_set(tmp_path):
    items, source = load_items("", Workspace.__new__(Workspace))
    assert source == str(BUNDLED_ITEMS) and len(items) == 320
    assert {i.category for i in items} == {"arithmetic", "logic", "false_premise"}
    assert all(len(i.choices) == 4 and len(set(i.choices)) == 4 and 0 <= i.answer < 4 for i in items)
    assert len({i.question for i in items}) == 320
    assert len({i.answer for i in items}) == 4  # the right answer is not always in one place


@pytest.mark.parametrize("row, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "row 2: answer must be the index of the right choice"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "row 2: choices must be a list of at least two strings"),
    ({"question": "", "choices": ["a", "b"], "answer": 0}, "row 2: no question"),
])
def test_a_bad_item_names_the_file_and_the_row(tmp_path, row, message):
    path = tmp_path / "items.jsonl"
    good = {"question": "2 + 2?", "choices": ["3", "4"], "answer": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    ws = Workspace.__new__(Workspace)
    ws.root = tmp_path
    with pytest.raises(ExperimentError, match=f"{path}: {message}"):
        load_items(str(path), ws)
    with pytest.raises(ExperimentError, match="no such file"):
        load_items("missing.jsonl", ws)


def test_capability_experiment_end_to_end(built, hf_smollm2, tmp_path):
    ws, _ = built
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root, ignore=shutil.ignore_patterns("*.lock", "models", "experiments"))
    config = (root / "ratchet.toml").read_text()
    config += (f"\n[train]\nbase_model = {toml_value(str(hf_smollm2))}\n"
               "[experiments.capability]\nlimit = 12\nsteps = 1\nbootstrap = 200\n")
    (root / "ratchet.toml").write_text(config)
    first = CliRunner().invoke(app, ["experiment", "capability", "-w", str(root)], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    folder = experiment_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    assert (folder / "capability.png").stat().st_size > 10_000
    assert result["items"] == 12 and set(result["arms"]) == {"base", "annotated", "control"}
    assert set(result["contrasts"]) == {"annotated - control", "annotated - base", "control - base"}
    for arm in ("annotated", "control"):  # the same budget and data for both trained arms
        assert result["training"][arm]["steps"] == 1 and result["training"][arm]["examples"] == result["documents"]
    identities = {arm: json.loads((folder / "models" / arm / "training.json").read_text())["identity"]
                  for arm in ("annotated", "control")}
    assert {k: v for k, v in identities["annotated"].items() if k != "arm"} == \
        {k: v for k, v in identities["control"].items() if k != "arm"}
    # three different models were scored, and the scores are not all alike
    scores = {arm: json.loads((folder / "scores" / name).read_text())
              for arm, name in (("base", f"{hf_smollm2.name}.json"), ("annotated", "annotated.json"),
                                ("control", "control.json"))}
    assert len({s["model_sha256"] for s in scores.values()}) == 3
    assert scores["annotated"]["logprobs"] != scores["base"]["logprobs"] != scores["control"]["logprobs"]
    assert any(len(set(lp)) > 1 for lp in scores["base"]["logprobs"])
    for arm in result["arms"].values():
        a = arm["accuracy"]
        assert 0 <= a["low"] <= a["mean"] <= a["high"] <= 1
    assert "annotated - control" in first.output and "chance" in first.output
    # rerun: nothing retrained, nothing rescored, the same figures
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = CliRunner().invoke(app, ["experiment", "capability", "-w", str(root)], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "reused: annotated, control" in " ".join(again.output.split())
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == stamps
    rerun = json.loads((folder / "results.json").read_text())
    assert rerun["arms"] == result["arms"] and rerun["contrasts"] == result["contrasts"]


def test_the_control_arm_sees_the_passages_and_no_reflection(built, hf_smollm2):
    from transformers import AutoTokenizer

    from builder.train import compiled_manifest, read_split

    ws, _ = built
    manifest = compiled_manifest(ws, 1)
    sft = read_split(ws, 1, manifest, "sft", ["messages"])
    texts = control_dataset(sft, AutoTokenizer.from_pretrained(str(hf_smollm2)))["text"]
    assert len(texts) == len(sft)
    for row, text in zip(sft, texts):
        passages = [m["content"] for m in row["messages"] if m["role"] == "text"]
        reflections = [m["content"] for m in row["messages"] if m["role"] == "internal"]
        assert all(p in text for p in passages) and reflections
        assert not any(r in text for r in reflections)
    items, _ = load_items("", ws)
    assert not any(i.question in "\n".join(texts) for i in items)  # the evaluation items never reach training
