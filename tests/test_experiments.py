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


def test_a_saved_dataset_is_scored_on_its_held_out_split_and_seeds_are_distinct(tmp_path):
    import datasets

    from builder.config import RatchetConfig

    row = lambda q: {"question": q, "choices": ["a", "b"], "answer": 0}  # noqa: E731
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row("train q")] * 3),
                          "test": datasets.Dataset.from_list([row("test q")] * 2)}).save_to_disk(str(tmp_path / "mc"))
    ws = Workspace.__new__(Workspace)
    ws.root = tmp_path
    items, source = load_items("mc", ws)
    assert [i.question for i in items] == ["test q", "test q"] and source.endswith("[split test]")
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row("q")]),
                          "extra": datasets.Dataset.from_list([row("q")])}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ExperimentError, match="splits train, extra, none of them test or validation"):
        load_items("two", ws)
    with pytest.raises(ValueError, match="a seed twice"):
        RatchetConfig.model_validate({"experiments": {"capability": {"seeds": [1, 1]}}})


def test_capability_experiment_end_to_end(built, hf_smollm2, tmp_path):
    ws, _ = built
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root, ignore=shutil.ignore_patterns("*.lock", "models", "experiments"))
    config = (root / "ratchet.toml").read_text()
    config += (f"\n[train]\nbase_model = {toml_value(str(hf_smollm2))}\n"
               "[experiments.capability]\nlimit = 12\nsteps = 1\nbootstrap = 200\nseeds = [1, 2]\n")
    (root / "ratchet.toml").write_text(config)
    first = CliRunner().invoke(app, ["experiment", "capability", "-w", str(root)], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    folder = experiment_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    assert (folder / "capability.png").stat().st_size > 10_000
    assert result["items"] == 12 and result["seeds"] == 2 and set(result["arms"]) == {"base", "annotated", "control"}
    assert set(result["contrasts"]) == {"annotated - control", "annotated - base", "control - base"}
    trained = ["annotated-s1", "control-s1", "annotated-s2", "control-s2"]
    assert sorted(result["training"]) == sorted(trained)
    for name in trained:  # the same budget and data for every trained arm
        assert result["training"][name]["steps"] == 1 and result["training"][name]["examples"] == result["documents"]
    identities = {name: json.loads((folder / "models" / name / "training.json").read_text())["identity"]
                  for name in trained}
    same = lambda name: {k: v for k, v in identities[name].items() if k not in ("arm", "train")}  # noqa: E731
    assert same("annotated-s1") == same("control-s1") == same("annotated-s2") == same("control-s2")
    assert identities["annotated-s1"]["train"] == identities["control-s1"]["train"]  # paired by seed
    assert identities["annotated-s1"]["train"]["seed"] == 1 and identities["annotated-s2"]["train"]["seed"] == 2
    # five different models were scored, and the scores are not all alike
    def scores_of(name):
        [path] = (folder / "scores").glob(f"{name}-*.json")  # named by the model and its weights
        return json.loads(path.read_text())

    names = [hf_smollm2.name] + trained
    scores = {name: scores_of(name) for name in names}
    assert len({s["model_sha256"] for s in scores.values()}) == 5
    assert len({json.dumps(s["logprobs"]) for s in scores.values()}) == 5
    assert any(len(set(lp)) > 1 for lp in scores[names[0]]["logprobs"])
    for arm in result["arms"].values():
        a = arm["accuracy"]
        assert 0 <= a["low"] <= a["mean"] <= a["high"] <= 1
    assert len(result["arms"]["annotated"]["per_seed"]) == 2 and len(result["arms"]["base"]["per_seed"]) == 1
    assert "annotated - control" in first.output and "chance" in first.output
    # rerun: nothing retrained, nothing rescored, the same figures
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = CliRunner().invoke(app, ["experiment", "capability", "-w", str(root)], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "reused: annotated-s1, annotated-s2, control-s1, control-s2" in " ".join(again.output.split())
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


def test_the_intervals_are_paired_by_item_and_by_seed():
    from builder.experiments.capability import Item, figures

    items = [Item(str(k), "c", f"q{k}", ("a", "b"), 0) for k in range(20)]
    right, wrong = [[0.0, -1.0]] * 20, [[-1.0, 0.0]] * 20
    half = [[0.0, -1.0]] * 10 + [[-1.0, 0.0]] * 10
    r = figures({"base": [half], "annotated": [right, right, right], "control": [wrong, half, wrong]}, items, 500, 0)
    assert r["seeds"] == 3 and r["arms"]["annotated"]["per_seed"] == [1.0, 1.0, 1.0]
    assert r["arms"]["control"]["per_seed"] == [0.0, 0.5, 0.0] and r["arms"]["base"]["per_seed"] == [0.5]
    d = r["contrasts"]["annotated - control"]["accuracy"]
    assert d["mean"] == round(1 - 0.5 / 3, 4) and d["low"] < d["mean"] < d["high"] <= 1.0  # the seeds spread it
    assert r["contrasts"]["annotated - base"]["accuracy"]["mean"] == 0.5


def test_choice_log_probabilities_match_one_sequence_at_a_time(hf_smollm2):
    """The batched scoring (padding, only the choice positions through the output layer) gives
    what a plain forward pass of each question + choice gives."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.experiments.capability import choice_logprobs, prompt

    tokenizer = AutoTokenizer.from_pretrained(str(hf_smollm2))
    model = AutoModelForCausalLM.from_pretrained(str(hf_smollm2)).eval()
    items, _ = load_items("", Workspace.__new__(Workspace))
    items = [items[0], items[150], items[300]]  # one of each kind, options of different lengths
    batched = choice_logprobs(model, tokenizer, items, batch_items=3)
    for item, scores in zip(items, batched):
        context = tokenizer(prompt(item), add_special_tokens=False)["input_ids"]
        for choice, score in zip(item.choices, scores):
            tail = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([context + tail])).logits[0].float()
            reference = torch.log_softmax(logits[len(context) - 1:-1], -1)[range(len(tail)), tail].sum()
            assert abs(score - float(reference)) < 1e-3
