import json
import re
import subprocess
import sys

from typer.testing import CliRunner

from builder.cli import app

runner = CliRunner()


def test_init_writes_a_config_and_copies_the_sample_corpus(tmp_path):
    result = runner.invoke(app, ["init", str(tmp_path / "ws"), "--example"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ws" / "ratchet.toml").exists()
    rows = (tmp_path / "ws" / "corpus" / "passages.jsonl").read_text().splitlines()
    assert len(rows) >= 25 and all(json.loads(r)["text"] for r in rows)
    again = runner.invoke(app, ["init", str(tmp_path / "ws")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_an_error_keeps_the_path_it_names_on_one_line(tmp_path):
    """A path longer than the terminal is not broken by a newline: it stays copyable and greppable
    (the check above once failed only because pytest's temporary folder had a longer name)."""
    deep = tmp_path / ("a-workspace-folder-with-a-long-name-" * 4) / "ws"
    assert runner.invoke(app, ["init", str(deep)]).exit_code == 0
    again = runner.invoke(app, ["init", str(deep)])
    assert again.exit_code == 1 and f"{deep / 'ratchet.toml'} already exists" in again.output
    assert len(str(deep)) > 120  # wider than the 80 columns rich assumes off a terminal


def test_init_scenario_sets_up_the_conscience_step_and_the_consent_gate(tmp_path):
    from builder.stages.conscience import load_items
    from builder.workspace import Workspace

    result = runner.invoke(app, ["init", str(tmp_path / "ws"), "--scenario", "code-hacking"])
    assert result.exit_code == 0, result.output
    ws = Workspace(tmp_path / "ws")
    cfg = ws.config
    assert cfg.conscience.items == "items/scenario.jsonl" and cfg.conscience.frameworks == ["three-laws", "wwjd"]
    assert cfg.consent.judges == ["bundled:smollm2", "bundled:gemma3"]
    items, skipped = load_items(ws.resolve(cfg.conscience.items), exclude=cfg.conscience.exclude)
    assert len(items) == 32 and not skipped  # 40 requests, the 8 held-out ones stay out of training
    assert list((tmp_path / "ws" / "corpus").iterdir())
    bad = runner.invoke(app, ["init", str(tmp_path / "other"), "--scenario", "nope"])
    assert bad.exit_code == 1 and "unknown scenario 'nope'" in bad.output


def test_every_command_has_help():
    for command in ["init", "build", "sql", "status", "eval-judge", "diff", "drift"]:
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output


def test_config_typo_is_reported_before_any_work(tmp_path):
    (tmp_path / "ratchet.toml").write_text("[corpus]\npaht = 'x'\n")
    result = runner.invoke(app, ["build", "--workspace", str(tmp_path)])
    assert result.exit_code == 1
    assert "corpus.paht" in result.output and "did you mean 'path'" in result.output


def test_not_a_workspace(tmp_path):
    result = runner.invoke(app, ["status", "--workspace", str(tmp_path)])
    assert result.exit_code == 1 and "not a workspace" in result.output


def test_sql_and_status_on_a_built_workspace(built):
    ws, s = built
    result = runner.invoke(app, ["sql", "--workspace", str(ws.root), "-f", "json",
                                 "SELECT status, count(*) AS n FROM annotations GROUP BY status"])
    assert result.exit_code == 0, result.output
    counts = {r["status"]: r["n"] for r in json.loads(result.output)}
    assert counts.get("accepted", 0) == s["accepted"]
    bad = runner.invoke(app, ["sql", "--workspace", str(ws.root), "SELEC nope"])
    assert bad.exit_code == 1 and "SQL" in bad.output
    status = runner.invoke(app, ["status", "--workspace", str(ws.root)])
    assert status.exit_code == 0 and "gen-0001" in status.output
    said = " ".join(re.sub(r"[│┃]", " ", status.output).split())  # a table cell wraps across lines
    # what people found of the kept reflections: nobody has audited this build, and it says so
    assert ("no person has audited a kept reflection yet" in said) == bool(s.get("per_kept_reflection")), said


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "builder.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "ratchet init" in proc.stdout


def test_missing_model_file_is_a_clear_error(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("A passage.")
    (tmp_path / "ratchet.toml").write_text(f'[annotator]\nmodel = "{tmp_path}/nope.gguf"\n')
    result = runner.invoke(app, ["build", "--workspace", str(tmp_path)])
    assert result.exit_code == 1
    assert "nope.gguf: model file not found" in " ".join(result.output.split())
    assert not list(tmp_path.glob("logs/llama-server-*.log"))  # found missing before any member's server started
    unknown = tmp_path / "ratchet.toml"
    unknown.write_text('[annotator]\nmodel = "bundled:llama9"\n')
    result = runner.invoke(app, ["build", "--workspace", str(tmp_path)])
    assert result.exit_code == 1 and "unknown bundled model 'llama9'" in result.output


def test_dry_run_runs_every_stage_without_a_model_and_writes_nothing(tmp_path):
    ws = tmp_path / "ws"
    assert runner.invoke(app, ["init", str(ws), "--scenario", "code-hacking"]).exit_code == 0
    before = sorted(p.relative_to(ws) for p in ws.rglob("*"))
    result = runner.invoke(app, ["build", "-w", str(ws), "--dry-run"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.replace("│", " ").split())  # a table cell's words, wherever rich wraps them
    assert "dry run: every stage ran on the scripted engine" in out and "answers without a model" in out
    assert "dpo pair(s) kept" in out and "consent gate" in out and "mean panel score" in out  # every stage ran
    assert sorted(p.relative_to(ws) for p in ws.rglob("*")) == before  # no database, no generation, no log
    bad = runner.invoke(app, ["build", "-w", str(ws), "--dry-run", "--generation", "2"])
    assert bad.exit_code == 1 and "--dry-run builds generation 1" in bad.output


def test_engines_lists_every_engine_and_one_engines_keys():
    from builder.backends import registry

    result = runner.invoke(app, ["engines"])
    assert result.exit_code == 0 and all(name in result.output for name in registry.ENGINES)
    one = runner.invoke(app, ["engines", "llama_server"])
    assert one.exit_code == 0 and "slots" in one.output and "server_binary" in one.output
    bad = runner.invoke(app, ["engines", "lama_server"])
    assert bad.exit_code == 1 and "did you mean 'llama_server'" in bad.output


def test_sql_cannot_read_or_write_other_files(tmp_path):
    from builder.build import run_build
    from builder.workspace import Workspace

    from ..conftest import SHORT_PASSAGES, write_workspace

    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES[:1], annotator={"backend": "scripted"})
    run_build(Workspace(root))
    ok = runner.invoke(app, ["sql", "-w", str(root), "SELECT count(*) AS n FROM passages"])
    assert ok.exit_code == 0 and "1 row(s)" in ok.output
    for query in [f"COPY (SELECT * FROM passages) TO '{tmp_path / 'leak.csv'}'", "SELECT * FROM read_csv('/etc/passwd')",
                  f"ATTACH '{tmp_path / 'other.duckdb'}'"]:
        result = runner.invoke(app, ["sql", "-w", str(root), query])
        assert result.exit_code == 1 and "Permission Error" in result.output, query
    assert not (tmp_path / "leak.csv").exists() and not (tmp_path / "other.duckdb").exists()
