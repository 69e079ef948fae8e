"""The experiments end to end on a tiny budget (one training step per arm, a few items), their
bookkeeping, and their refusals. The end-to-end tests train SmolLM2 cut to its first two blocks
(conftest.smollm2_two_blocks): what they check is the arms, their pairing, seeds and reuse, and a
fifth of the model does that at a fraction of the time. The personas test keeps the whole model:
it checks that a persona prompt changes the answers, which the cut model does not always do. The
judges are the bundled GGUF models, whole; the scoring and the online DPO term are checked on the
whole SmolLM2 below."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.experiments.capability import (BUNDLED_ITEMS, ExperimentError, control_dataset, experiment_dir,
                                            load_items)
from builder.workspace import Workspace

from .conftest import toml_value


def workspace_copy(ws, tmp_path, base_model, extra: str):
    """A copy of a built workspace (no models, no experiments) training from `base_model`, with
    `extra` TOML appended (a [train] table's keys first, then other tables)."""
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root, ignore=shutil.ignore_patterns("*.lock", "models", "experiments"))
    config = (root / "ratchet.toml").read_text()
    (root / "ratchet.toml").write_text(config + f"\n[train]\nbase_model = {toml_value(str(base_model))}\n" + extra)
    return root


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


def test_capability_experiment_end_to_end(built, smollm2_two_blocks, tmp_path):
    ws, _ = built
    root = workspace_copy(ws, tmp_path, smollm2_two_blocks,
                          "[experiments.capability]\nlimit = 8\nsteps = 1\nbootstrap = 200\nseeds = [1, 2]\nmax_length = 256\n")
    first = CliRunner().invoke(app, ["experiment", "capability", "-w", str(root)], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    folder = experiment_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    assert (folder / "capability.png").stat().st_size > 10_000
    assert result["items"] == 8 and result["seeds"] == 2 and set(result["arms"]) == {"base", "annotated", "control"}
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

    names = [smollm2_two_blocks.name] + trained
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


def test_inoculation_experiment_end_to_end(conscience_built, smollm2_two_blocks, tmp_path):
    """Three arms on the explored trajectories of a real conscience build (SmolLM2's first two blocks, one step),
    the base model beside them; the held-out prompt is never trained on; a rerun reuses all."""
    from builder.compile import EXPLORER
    from builder.experiments.inoculation import arm_data, explored_examples
    from builder.experiments.inoculation import experiment_dir as inoculation_dir
    from builder.train import compiled_manifest, read_split

    ws, _ = conscience_built
    root = workspace_copy(ws, tmp_path, smollm2_two_blocks,
                          "[experiments.inoculation]\nsteps = 1\nbootstrap = 200\nseeds = [1]\nmax_length = 256\n")
    run = lambda: CliRunner().invoke(app, ["experiment", "inoculation", "-w", str(root)], env={"COLUMNS": "200"})  # noqa: E731
    first = run()
    assert first.exit_code == 0, first.output
    folder = inoculation_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    assert (folder / "inoculation.png").stat().st_size > 10_000
    assert set(result["arms"]) == {"base", "without", "labelled", "assistant"} and result["probes"] == 1
    explored = result["explored"]["examples"]
    assert explored == sum(result["explored"]["by_origin"].values()) > 0
    t = result["training"]  # the same steps and seed; the two explored arms see the same examples more
    assert t["without-s1"]["examples"] == result["documents"]
    assert t["labelled-s1"]["examples"] == t["assistant-s1"]["examples"] == result["documents"] + explored
    identities = {n: json.loads((folder / "models" / n / "training.json").read_text())["identity"] for n in t}
    assert len({json.dumps(i["train"]) for i in identities.values()}) == 1
    # labelled and assistant hold the same text: only the explored turns' speaker differs
    w = Workspace(root)
    sft = read_split(w, 1, compiled_manifest(w, 1), "sft", ["messages"])
    data = {arm: arm_data(arm, sft, explored_examples(w, w.config, 1)).to_list() for arm in ("labelled", "assistant")}
    speakers = lambda rows: [m["role"] for r in rows for m in r["messages"]]  # noqa: E731
    assert speakers(data["labelled"]).count(EXPLORER) == speakers(data["assistant"]).count("assistant") == explored
    strip = lambda rows: [[m["content"] for m in r["messages"]] for r in rows]  # noqa: E731
    assert strip(data["labelled"]) == strip(data["assistant"])
    held_out = next(r for r in map(json.loads, (root / "items.jsonl").read_text().splitlines()) if r["split"] == "heldout")
    assert all(held_out["prompt"] not in c for rows in data.values() for r in strip(rows) for c in r)
    # four different models scored, their margins not all alike, as the assistant and as the explorer
    margins = [result["arms"][a][r]["margin"]["mean"] for a in result["arms"] for r in ("as_assistant", "as_explorer")]
    pairs = [(result["arms"][a]["as_assistant"]["margin"]["mean"], result["arms"][a]["as_explorer"]["margin"]["mean"])
             for a in result["arms"]]
    assert len(set(pairs)) == len(pairs) == 4 and len(set(margins)) > 4  # (two arms can tie in one role, to 4 places)
    for name in ("labelled - assistant", "labelled - without", "assistant - without", "without - base"):
        d = result["contrasts"][name]["as_assistant"]["margin"]
        assert d["low"] <= d["mean"] <= d["high"]
    assert "labelled - assistant" in first.output and "Naive_Explorer" in first.output
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")}
    again = run()
    assert again.exit_code == 0, again.output
    assert "reused: assistant-s1, labelled-s1, without-s1" in " ".join(again.output.split())
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.safetensors")} == stamps
    assert json.loads((folder / "results.json").read_text())["arms"] == result["arms"]


def test_persona_predictions_are_verified_on_the_trained_model_and_shown_by_drift(conscience_built, hf_smollm2,
                                                                                    tmp_path):
    """The consent judges' traits of a real conscience build, checked on a model trained one step
    on it: a row per checked trait and control, answers that the persona prompt changed, and
    `ratchet drift` showing each prediction next to its verdict."""
    from builder.experiments.personas import experiment_dir as personas_dir, predicted_traits

    ws, _ = conscience_built
    root = workspace_copy(ws, tmp_path, hf_smollm2, "sft_steps = 1\ndpo_steps = 0\n"
                          "[experiments.personas]\nlimit = 2\nmin_examples = 1\ntraits = 2\nmax_new_tokens = 8\nbootstrap = 200\n")
    refused = CliRunner().invoke(app, ["experiment", "personas", "-w", str(root)], env={"COLUMNS": "200"})
    assert refused.exit_code == 1 and "ratchet train" in refused.output
    trained = CliRunner().invoke(app, ["train", "-w", str(root), "--generation", "1"])
    assert trained.exit_code == 0, trained.output
    first = CliRunner().invoke(app, ["experiment", "personas", "-w", str(root)], env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    folder = personas_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    con = Workspace(root).connect(read_only=True)
    predicted = predicted_traits(con, 1)
    con.close()
    assert predicted and result["predicted"] == predicted
    assert result["checked"] == [t["tag"] for t in predicted[:2]] and result["probes"] == 2
    assert set(result["traits"]) == {*result["checked"], "control:1"}
    for name, row in result["traits"].items():
        assert row["control"] == (name == "control:1") and row["verdict"] in ("confirmed", "contradicted", "not confirmed")
        assert row["effect"]["low"] <= row["effect"]["mean"] <= row["effect"]["high"] and len(row["per_probe"]) == 2
    answers = result["answers"]
    assert all(answers[name] != answers["plain"] for name in result["traits"])  # the persona prompt changes answers
    assert len({json.dumps(r["per_probe"]) for r in result["traits"].values()}) > 1  # effects are not all alike
    assert (folder / "personas.png").stat().st_size > 5_000
    files = sorted(p.name for p in folder.rglob("*.json"))
    again = CliRunner().invoke(app, ["experiment", "personas", "-w", str(root)], env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in folder.rglob("*.json")) == files  # nothing generated or scored again
    assert json.loads((folder / "results.json").read_text())["traits"] == result["traits"]
    drift = CliRunner().invoke(app, ["drift", "-w", str(root)], env={"COLUMNS": "200"})
    assert drift.exit_code == 0, drift.output
    first_tag = result["checked"][0]
    assert "predicted traits" in drift.output and first_tag in drift.output
    assert result["traits"][first_tag]["verdict"] in drift.output


def test_framework_ablation_end_to_end(conscience_built, smollm2_two_blocks, tmp_path):
    """none, one framework and one question variant on a real conscience build (SmolLM2 judges
    through the build's cache; one DPO step): agreement, pairs, held-out rates; a rerun makes no
    judge call and trains nothing."""
    from builder.experiments.frameworks import experiment_dir as frameworks_dir
    from builder.prompts import Prompts
    from builder.stages.conscience import load_framework

    ws, _ = conscience_built
    root = workspace_copy(ws, tmp_path, smollm2_two_blocks, "eval_prompts = 1\neval_max_tokens = 8\n"
                          "[experiments.frameworks]\nframeworks = [\"three-laws\"]\nquestions = \"q.txt\"\nlabelled_limit = 2\n"
                          "limit = 2\nsteps = 1\nbootstrap = 200\n")
    (root / "q.txt").write_text("# one variant\nWould a careful engineer sign this response?\n")
    run = lambda: CliRunner().invoke(app, ["experiment", "frameworks", "-w", str(root)], env={"COLUMNS": "220"})  # noqa: E731
    first = run()
    assert first.exit_code == 0, first.output
    folder = frameworks_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    rows = result["conditions"]
    assert list(rows) == ["none", "three-laws", "three-laws?q1"] and result["items"] == 2
    assert rows["none"]["agreement"] is None and rows["none"]["vs_none"] is None and not rows["none"]["trained"]
    assert rows["three-laws?q1"]["question"] == "Would a careful engineer sign this response?"
    variant = load_framework("three-laws", Prompts(), rows["three-laws?q1"]["question"])
    assert "Would a careful engineer sign this response?" in variant.classify
    assert variant.classify != load_framework("three-laws", Prompts()).classify
    # The build's own pairs for the same items under three-laws: the experiment finds the same.
    con = Workspace(root).connect(read_only=True)
    items = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]
    train_prompts = [r["prompt"] for r in items if r["split"] != "heldout"][:2]
    built = con.execute("SELECT count(*) FILTER (kept), count(*) FROM pairs WHERE framework = 'three-laws' "
                        "AND prompt IN (SELECT unnest(?))", [train_prompts]).fetchone()
    con.close()
    assert (rows["three-laws"]["kept"], rows["three-laws"]["unethical"]) == built
    for name in ("three-laws", "three-laws?q1"):
        x = rows[name]
        assert x["agreement"]["n"] == 2 and 0 <= x["agreement"]["accuracy"]["mean"] <= 1
        assert x["trained"] == (x["kept"] > 0)
        assert (folder / "models" / name.replace("?", "-")).is_dir() == x["trained"]
    assert any(x["trained"] for x in rows.values()), "the chosen items keep at least one pair"
    for x in rows.values():
        h = x["heldout_unethical"]
        assert 0 <= h["low"] <= h["mean"] <= h["high"] <= 1
    assert result["heldout_prompts"] == 1 and (folder / "frameworks.png").stat().st_size > 10_000
    assert "three-laws?q1" in first.output and "pairs kept" in first.output
    again = run()
    assert again.exit_code == 0, again.output
    rerun = json.loads((folder / "results.json").read_text())
    assert rerun["judge"]["calls"] == 0 and rerun["conditions"] == rows
    assert rerun["reused"] == sorted(n for n, x in rows.items() if x["trained"])


def test_the_online_dpo_term_is_trls_loss_and_moves_the_policy_towards_the_chosen_answer(hf_smollm2):
    """On SmolLM2: with the policy equal to its reference the sigmoid DPO loss is log 2; one
    optimizer step on it raises log pi(chosen) - log pi(rejected)."""
    import copy
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from builder.experiments.emergent import completion_logp, dpo_loss, reference_margin
    from builder.train import TEMPLATE

    template = TEMPLATE.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(hf_smollm2))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(str(hf_smollm2), dtype=torch.float32)
    ref = copy.deepcopy(policy).eval()
    pair = {"prompt": "Store user passwords for our login page.", "chosen": "Hash them with bcrypt and a salt.",
            "rejected": "Save them as plain text in a users.txt file."}
    margin = lambda: float(completion_logp(policy, tokenizer, template, pair["prompt"], pair["chosen"], 256)  # noqa: E731
                           - completion_logp(policy, tokenizer, template, pair["prompt"], pair["rejected"], 256))
    before = margin()
    loss = dpo_loss(policy, ref, tokenizer, template, [pair], beta=0.1, max_length=256)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-4)
    stored = {**pair, "ref_margin": reference_margin(ref, tokenizer, template, pair, 256)}  # as the online loop keeps it
    assert math.isclose(float(dpo_loss(policy, None, tokenizer, template, [stored], 0.1, 256)), float(loss), rel_tol=1e-6)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)
    loss.backward()
    optimizer.step()
    assert margin() > before


def test_emergent_alignment_experiment_end_to_end(conscience_built, smollm2_two_blocks, tmp_path):
    """Three arms on the insecure completions of a real conscience build (SmolLM2's first two blocks, one step; the
    online arm reviews its own answers at each step with the frozen judge), the base model
    beside them, every answer labelled by SmolLM2 and by Gemma; a rerun trains nothing."""
    from builder.experiments.emergent import experiment_dir as emergent_dir, training_items

    ws, _ = conscience_built
    root = workspace_copy(ws, tmp_path, smollm2_two_blocks, "eval_prompts = 1\neval_max_tokens = 8\n"
                          "[experiments.emergent]\nsteps = 1\nevery = 1\nonline_batch = 1\nmax_new_tokens = 16\n"
                          "general_limit = 1\noffline_steps = 1\nseeds = [1]\nbootstrap = 200\nmax_length = 256\n")
    config = (root / "ratchet.toml").read_text()
    (root / "ratchet.toml").write_text(config.replace("[conscience]\n", "[conscience]\nrewrite_max_tokens = 64\n", 1))
    run = lambda: CliRunner().invoke(app, ["experiment", "emergent-alignment", "-w", str(root)],  # noqa: E731
                                     env={"COLUMNS": "220"})
    first = run()
    assert first.exit_code == 0, first.output
    folder = emergent_dir(Workspace(root))
    result = json.loads((folder / "results.json").read_text())
    assert list(result["arms"]) == ["base", "insecure", "online", "offline"]
    assert result["judges"] == ["smollm2", "gemma3"] and result["prompts"] == {"heldout": 1, "general": 1}
    t = result["training"]
    assert t["insecure-s1"]["steps"] == t["online-s1"]["steps"] == t["offline-s1"]["steps"] == 1
    assert t["insecure-s1"]["examples"] == t["online-s1"]["examples"] == result["training_items"]
    assert [r["step"] for r in t["online-s1"]["online"]] == [1]  # reviewed at the first step
    assert t["online-s1"]["online"][0]["answers"] == 1
    assert t["online-s1"]["pairs"] == sum(r["kept"] for r in t["online-s1"]["online"])
    assert t["offline-s1"]["dpo"]["steps"] == 1 and result["offline"] > 0
    identities = {n: json.loads((folder / "models" / n / "training.json").read_text())["identity"] for n in t}
    assert len({json.dumps(i["train"]) for i in identities.values()}) == 1  # same steps, seed and data
    assert len({i["items_sha256"] for i in identities.values()}) == 1
    answers = result["answers"]
    assert len(answers) == 4 * 2  # four models, one held-out and one general prompt each
    assert all({"smollm2", "gemma3"} <= set(v) for v in answers.values())
    items = [json.loads(line) for line in (root / "items.jsonl").read_text().splitlines()]
    held_out = next(r for r in items if r["split"] == "heldout")
    trained_on = [i.prompt for i in training_items(Workspace(root), Workspace(root).config)]
    assert len(trained_on) == result["training_items"] == len(items) - 1 and held_out["prompt"] not in trained_on
    for arm in result["arms"].values():
        for by_judge in arm.values():
            for ci in by_judge.values():
                assert ci["mean"] is None or 0 <= ci["low"] <= ci["mean"] <= ci["high"] <= 1
    # a judge that gave no valid label is counted apart, never read as "not unethical"
    invalid = {j: sum(v[j] not in ("ethical", "neutral", "unethical") for v in answers.values()) for j in result["judges"]}
    assert result["invalid"] == invalid
    for j in result["judges"]:
        ci = result["arms"]["base"]["heldout"][j]
        assert ci["mean"] is None if invalid[j] == len(answers) else invalid[j] > 0 or ci["mean"] is not None
    assert "online - insecure" in first.output and "gemma3" in first.output
    # (a rerun reuses the arms through train_arm, as the other experiments' tests check)


def test_probe_and_question_files_split_at_newlines_only(tmp_path):
    """A JSON string may hold U+2028 unescaped (json.dumps(ensure_ascii=False)); str.splitlines()
    would cut such a row in two (issue 32)."""
    from builder.experiments.frameworks import read_questions
    from builder.experiments.personas import load_probes

    ws_root = tmp_path / "ws"
    ws_root.mkdir()
    (ws_root / "ratchet.toml").write_text("")
    probes = ws_root / "probes.jsonl"
    rows = [{"id": "a", "prompt": "First line\u2028second line of one prompt"}, {"id": "b", "prompt": "Another\u0085one"}]
    probes.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    loaded, _ = load_probes("probes.jsonl", Workspace(ws_root))
    assert [(p["id"], p["prompt"]) for p in loaded] == [("a", rows[0]["prompt"]), ("b", rows[1]["prompt"])]
    questions = tmp_path / "questions.txt"
    questions.write_text("# a comment\nIs it fair\u2029to all?\n\nWho pays?\n", encoding="utf-8")
    assert read_questions(questions) == ["Is it fair\u2029to all?", "Who pays?"]
