"""`ratchet publish`: a Hub-layout git repository on disk, and the push to the Hub up to the
network call (the Hub cannot be reached from these machines: a recorder stands in for HfApi)."""
import json
from importlib.metadata import version
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import hashlib

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import builder.publish as publish
from builder.cli import app
from builder.compile import split_path

from .conftest import write_workspace

runner = CliRunner()
HUB_MAJOR = int(version("huggingface_hub").split(".")[0])
# Recognisable and fake: not shaped like a real Hub token, so no secret scanner mistakes it for one.
TOKEN = "test-only-token-that-must-never-leak-0123456789"
CARD = """---
license: cc-by-4.0
pretty_name: tiny
configs:
{configs}
---

# tiny generation {n}
"""


MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema([("id", pa.string()), ("generation", pa.int32()), ("messages", pa.list_(MESSAGE))])


def write_split(rows: list[dict], folder: Path, split: str) -> str:
    """A split file named like compile names them: data/{split}-{sha12}.parquet."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), sink)
    data = sink.getvalue().to_pybytes()
    name = f"data/{split}-{hashlib.sha256(data).hexdigest()[:12]}.parquet"
    (folder / name).write_bytes(data)
    return name


def sft_row(n: int, i: int) -> dict:
    messages = [{"role": "text", "content": f"passage {i} of generation {n}"},
                {"role": "internal", "content": f"reflection {i} (gen {n})"}]
    return {"id": f"g{n}-{i:03d}", "generation": n, "messages": messages}


def make_generation(ws: Path, n: int, rows: int = 3, plot: bool = True) -> Path:
    """A compiled-looking generation folder: real parquet splits, a manifest and a card."""
    folder = ws / "generations" / f"gen-{n:04d}"
    (folder / "data").mkdir(parents=True)
    splits = {"sft": write_split([sft_row(n, i) for i in range(rows)], folder, "sft"),
              "extra": write_split([sft_row(n, 100 + i) for i in range(2)], folder, "extra")}
    configs = "\n".join(f"- config_name: {k}\n  data_files:\n  - split: train\n    path: {v}" for k, v in splits.items())
    (folder / "README.md").write_text(CARD.format(configs=configs, n=n), encoding="utf-8")
    manifest = {"generation": n, "name": "ws", "splits": splits, "config_hash": "abc",
                "counts": {"sft_examples": rows, "dpo_pairs": 0, "annotations_accepted": 0, "annotations_rejected": 0}}
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    if plot:
        (folder / "quality.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([n]) * 64)
    return folder


@pytest.fixture
def ws(tmp_path):
    root = write_workspace(tmp_path / "ws")
    make_generation(root, 1, rows=3)
    make_generation(root, 2, rows=5)
    return root


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def tree_at(repo: Path, rev: str) -> set[str]:
    return set(git(repo, "ls-tree", "-r", "--name-only", rev).split())


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def cli(*args: str):
    return runner.invoke(app, ["publish", *args], env={"COLUMNS": "400"})  # wide: rich wraps nothing


# ------------------------------------------------------------------- on disk

def test_local_one_commit_and_tag_per_generation(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Somebody Else")  # the user's git identity must not leak in
    out = tmp_path / "out"
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "2 generation(s) published, 0 skipped" in r.output
    assert git(out, "tag", "--list").split() == ["gen-0001", "gen-0002"]
    log = git(out, "log", "--format=%an <%ae>|%ad|%s", "--date=unix").splitlines()
    assert len(log) == 2
    assert log[1] == ("Moral Ratchet <ratchet@moral-ratchet.invalid>|946684801|"
                      "Moral Ratchet generation 1: 3 sft examples, 0 dpo pairs, 0 annotations")
    assert log[0].startswith("Moral Ratchet <ratchet@moral-ratchet.invalid>|946684802|Moral Ratchet generation 2: 5 sft")
    assert "sft_examples: 5" in git(out, "log", "-1", "--format=%b")
    for n in (1, 2):
        gen = ws / "generations" / f"gen-{n:04d}"
        assert tree_at(out, f"gen-{n:04d}") == files_of(gen) | {".gitattributes"}
        for rel in files_of(gen):  # byte for byte
            assert git(out, "rev-parse", f"gen-{n:04d}:{rel}").strip() == \
                   git(out, "hash-object", "--no-filters", str(gen / rel)).strip()
    # the tag of generation 2 holds none of generation 1's data files
    gen1_data = {f for f in files_of(ws / "generations" / "gen-0001") if f.startswith("data/")}
    assert not gen1_data & tree_at(out, "gen-0002")
    assert files_of(out) - {f for f in files_of(out) if f.startswith(".git/")} == tree_at(out, "HEAD")
    assert git(out, "status", "--porcelain") == ""
    assert "filter=lfs" not in (out / ".gitattributes").read_text()

    from datasets import load_dataset

    sft = load_dataset(str(out), "sft", split="train", cache_dir=str(tmp_path / "cache"))
    assert sft["id"] == [f"g2-{i:03d}" for i in range(5)]
    extra = load_dataset(str(out), "extra", split="train", cache_dir=str(tmp_path / "cache"))
    assert extra["id"] == ["g2-100", "g2-101"]

    # the same generations give the same commits anywhere: fixed identity and dates
    again = tmp_path / "again"
    assert cli("-w", str(ws), "--out", str(again)).exit_code == 0
    assert git(again, "rev-parse", "gen-0002^{commit}") == git(out, "rev-parse", "gen-0002^{commit}")


def test_local_rerun_is_idempotent_and_publishes_only_new(ws, tmp_path):
    out = tmp_path / "out"
    assert cli("-w", str(ws), "--out", str(out)).exit_code == 0
    head = git(out, "rev-parse", "HEAD")
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "0 generation(s) published, 2 skipped" in r.output
    assert "already published (tag gen-0001 exists)" in r.output
    assert git(out, "rev-parse", "HEAD") == head
    make_generation(ws, 3, rows=2, plot=False)
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "1 generation(s) published, 2 skipped" in r.output
    assert git(out, "tag", "--list").split() == ["gen-0001", "gen-0002", "gen-0003"]
    assert len(git(out, "log", "--format=%H").split()) == 3
    assert tree_at(out, "gen-0003") == files_of(ws / "generations" / "gen-0003") | {".gitattributes"}
    assert not (out / "quality.png").exists()  # generation 2's plot went with generation 2


def test_local_run_stopped_before_its_tag_is_tagged_not_committed_again(ws, tmp_path):
    out = tmp_path / "out"
    assert cli("-w", str(ws), "--out", str(out)).exit_code == 0
    head = git(out, "rev-parse", "HEAD")
    git(out, "tag", "-d", "gen-0002")  # as if the run had stopped between the commit and the tag
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert "1 generation(s) published, 1 skipped" in r.output and "stopped before tagging" in r.output
    assert git(out, "rev-parse", "HEAD") == head == git(out, "rev-parse", "gen-0002^{commit}")


def test_local_rebuilt_generation_is_reported_not_moved(ws, tmp_path):
    out = tmp_path / "out"
    assert cli("-w", str(ws), "--out", str(out)).exit_code == 0
    (ws / "generations" / "gen-0002" / "quality.png").write_bytes(b"changed")
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 0
    assert "rebuilt after publishing" in r.output
    shown = subprocess.run(["git", "-C", str(out), "show", "gen-0002:quality.png"], check=True, capture_output=True)
    assert shown.stdout == b"\x89PNG\r\n\x1a\n" + bytes([2]) * 64  # the tag still holds what was published


def test_local_only_one_generation_and_never_backwards(ws, tmp_path):
    out = tmp_path / "out"
    r = cli("-w", str(ws), "--out", str(out), "--generation", "2")
    assert r.exit_code == 0, r.output
    assert git(out, "tag", "--list").split() == ["gen-0002"]
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 0
    assert "older than gen-0002" in r.output
    assert git(out, "tag", "--list").split() == ["gen-0002"]


def test_local_dry_run_writes_nothing(ws, tmp_path):
    out = tmp_path / "out"
    r = cli("-w", str(ws), "--out", str(out), "--dry-run")
    assert r.exit_code == 0, r.output
    assert not out.exists()
    sft1 = json.loads((ws / "generations/gen-0001/manifest.json").read_text())["splits"]["sft"]
    assert f"+ {sft1}" in r.output and f"- {sft1}" in r.output  # added by gen 1, deleted by gen 2
    assert "Moral Ratchet generation 2: 5 sft examples" in r.output and "then tag gen-0002" in r.output
    assert "2 generation(s) would publish" in r.output and "nothing was written or uploaded" in r.output
    assert cli("-w", str(ws), "--out", str(out)).exit_code == 0
    head = git(out, "rev-parse", "HEAD")
    make_generation(ws, 3)
    r = cli("-w", str(ws), "--out", str(out), "--dry-run")
    assert "1 generation(s) would publish, 2 skipped" in r.output
    assert git(out, "rev-parse", "HEAD") == head and git(out, "tag", "--list").split() == ["gen-0001", "gen-0002"]


# ------------------------------------------------------------------- bad input

def test_refuses_a_folder_it_did_not_write(ws, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 1
    assert "not a repository written by `ratchet publish`" in r.output and str(out) in r.output
    assert files_of(out) == {"notes.txt"}
    subprocess.run(["git", "init", "-q", str(out)], check=True)  # a git repo, but someone else's
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 1 and "not a repository written by `ratchet publish`" in r.output


def test_refuses_uncommitted_changes(ws, tmp_path):
    out = tmp_path / "out"
    assert cli("-w", str(ws), "--out", str(out), "--generation", "1").exit_code == 0
    (out / "README.md").write_text("edited by hand")
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 1 and "uncommitted changes" in r.output
    assert git(out, "tag", "--list").split() == ["gen-0001"]


@pytest.mark.parametrize("damage, message", [
    (lambda g: (g / "manifest.json").write_text("{not json"), "unreadable manifest"),
    (lambda g: (g / "manifest.json").unlink(), "manifest.json: missing"),
    (lambda g: (g / "manifest.json").write_text(json.dumps({"generation": 2})), "no 'splits'"),
    (lambda g: (g / "manifest.json").write_text(json.dumps({"generation": 7, "splits": {"sft": "x"}})), "'generation' is 7"),
    (lambda g: [p.unlink() for p in (g / "data").glob("sft-*")], "split 'sft'"),
    (lambda g: (g / "README.md").write_text("---\nlicense: [unclosed\n---\n"), "does not parse"),
    (lambda g: (g / "README.md").write_text("---\nlicense: mit\n---\n# no configs\n"), "no 'configs'"),
])
def test_broken_generation_is_named(ws, tmp_path, damage, message):
    gen = ws / "generations" / "gen-0002"
    damage(gen)
    out = tmp_path / "out"
    r = cli("-w", str(ws), "--out", str(out))
    assert r.exit_code == 1
    assert message in r.output and str(gen) in r.output
    assert not out.exists()  # checked before anything is written


def test_missing_workspace_and_no_generations(tmp_path):
    r = cli("-w", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "not a workspace" in r.output
    root = write_workspace(tmp_path / "empty")
    r = cli("-w", str(root), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "no compiled generation" in r.output and "ratchet build" in r.output
    r = cli("-w", str(root), "--out", str(tmp_path / "out"), "--generation", "3")
    assert r.exit_code == 1 and "generation 3 is not compiled" in r.output
    r = cli("-w", str(root))
    assert r.exit_code == 1 and "exactly one target" in r.output
    assert not (tmp_path / "out").exists()


def test_git_missing_is_a_clear_error(ws, tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    r = cli("-w", str(ws), "--out", str(tmp_path / "out"))
    assert r.exit_code == 1 and "git is not installed" in r.output


def test_help_teaches():
    r = runner.invoke(app, ["publish", "--help"])
    assert r.exit_code == 0
    for text in ("--out", "--repo-id", "--dry-run", "gen-0001", "HF_TOKEN", "ratchet publish -w my-ws --out"):
        assert text in r.output


# ------------------------------------------------------------------- the Hub, up to the network call

def http_error(status: int, text: str = ""):
    from huggingface_hub.errors import HfHubHTTPError

    client = pytest.importorskip("httpx2") if HUB_MAJOR >= 2 else httpx  # the client huggingface_hub uses
    request = client.Request("POST", "https://huggingface.co/api/datasets/org/name/commit/main")
    return HfHubHTTPError(f"{status} error {text}", response=client.Response(status, request=request))


class FakeHub:
    """Records every HfApi call and keeps a repository's files, tags and commits in memory.
    It fakes only the network, which these machines cannot reach."""

    def __init__(self, files=(".gitattributes",), tags=(), fail: dict | None = None):
        self.files, self.tags, self.commits, self.calls = set(files), set(tags), [], []
        self.fail = fail or {}  # method -> list of exceptions to raise, one per call, before succeeding

    def _record(self, name, *args, **kwargs):
        self.calls.append((name, args, kwargs))
        if self.fail.get(name):
            raise self.fail[name].pop(0)

    def create_repo(self, repo_id, **kw):
        self._record("create_repo", repo_id, **kw)

    def list_repo_refs(self, repo_id, **kw):
        self._record("list_repo_refs", repo_id, **kw)
        return SimpleNamespace(tags=[SimpleNamespace(name=t) for t in sorted(self.tags)], branches=[])

    def list_repo_files(self, repo_id, **kw):
        self._record("list_repo_files", repo_id, **kw)
        return sorted(self.files)

    def list_repo_commits(self, repo_id, **kw):
        self._record("list_repo_commits", repo_id, **kw)
        return [SimpleNamespace(commit_id=c["oid"], title=c["message"]) for c in reversed(self.commits)]

    def create_commit(self, repo_id, operations, **kw):
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        commit = {"oid": f"{len(self.commits) + 1:040x}", "message": kw["commit_message"],
                  "adds": sorted(o.path_in_repo for o in operations if isinstance(o, CommitOperationAdd)),
                  "deletes": sorted(o.path_in_repo for o in operations if isinstance(o, CommitOperationDelete)),
                  "kw": kw}
        after_landing = self.fail.get("create_commit_after")
        self._record("create_commit", repo_id, operations, **kw)
        assert all(Path(o.path_or_fileobj).is_file() for o in operations if isinstance(o, CommitOperationAdd))
        self.files = (self.files - set(commit["deletes"])) | set(commit["adds"])
        self.commits.append(commit)
        if after_landing:
            raise after_landing.pop(0)  # it landed, but the answer is lost
        return SimpleNamespace(oid=commit["oid"], commit_url="https://huggingface.co/fake")

    def create_tag(self, repo_id, **kw):
        self._record("create_tag", repo_id, **kw)
        self.tags.add(kw["tag"])


def push(ws, fake, **kw):
    validated = []
    kw.setdefault("validate", lambda path: validated.append(path))
    result = publish.publish_hub(publish.load_generations(ws), "org/name", api=fake, token=TOKEN,
                                 sleep=lambda s: None, **kw)
    return result, validated


def test_push_operations(ws):
    fake = FakeHub(files={".gitattributes", "README.md"})
    result, validated = push(ws, fake)
    gens = [ws / "generations" / f"gen-{n:04d}" for n in (1, 2)]
    assert [c[0] for c in fake.calls] == ["create_repo", "list_repo_refs", "list_repo_files",
                                          "create_commit", "create_tag", "create_commit", "create_tag"]
    assert all(c[2].get("repo_type") == "dataset" for c in fake.calls)
    assert fake.calls[0][2] == {"repo_type": "dataset", "private": None, "exist_ok": True}
    assert validated == [g / "README.md" for g in gens]  # every card, before the first upload
    c1, c2 = fake.commits
    assert c1["adds"] == sorted(files_of(gens[0])) and c1["deletes"] == []
    assert c1["message"] == "Moral Ratchet generation 1: 3 sft examples, 0 dpo pairs, 0 annotations"
    assert "sft_examples: 3" in c1["kw"]["commit_description"]
    assert c2["adds"] == sorted(files_of(gens[1]))
    assert c2["deletes"] == sorted(f for f in files_of(gens[0]) if f.startswith("data/"))
    assert fake.files == files_of(gens[1]) | {".gitattributes"}
    tags = [c[2] for c in fake.calls if c[0] == "create_tag"]
    assert [(t["tag"], t["revision"]) for t in tags] == [("gen-0001", c1["oid"]), ("gen-0002", c2["oid"])]
    assert result.target == "https://huggingface.co/datasets/org/name"
    # again: both tags exist, so nothing is uploaded
    again, validated = push(ws, fake)
    assert len(fake.commits) == 2 and validated == [] and len(again.skipped) == 2


def test_push_skips_tags_already_on_the_hub(ws):
    gen1 = ws / "generations" / "gen-0001"
    fake = FakeHub(files=files_of(gen1) | {".gitattributes"}, tags={"gen-0001", "v1.0"})
    result, validated = push(ws, fake)
    assert [s.generation.tag for s in result.published] == ["gen-0002"]
    assert "tag gen-0001 exists" in result.skipped[0].reason
    assert validated == [ws / "generations/gen-0002/README.md"]
    (commit,) = fake.commits
    assert ".gitattributes" not in commit["deletes"] and "README.md" not in commit["deletes"]
    assert set(commit["deletes"]) == {f for f in files_of(gen1) if f.startswith("data/")}


def test_push_retries_transient_failures(ws):
    fake = FakeHub(fail={"create_repo": [httpx.ConnectError("connection refused")],
                         "create_commit": [http_error(503), http_error(429)],
                         "create_tag": [httpx.ReadTimeout("timed out")]})
    lines, sleeps = [], []
    result = publish.publish_hub(publish.load_generations(ws), "org/name", api=fake, token=TOKEN,
                                 validate=lambda p: None, sleep=sleeps.append, log=lines.append)
    assert len(result.published) == 2 and len(fake.commits) == 2
    assert [c[0] for c in fake.calls].count("create_commit") == 4
    assert len(sleeps) == 4 and sleeps[1] < sleeps[2]  # exponential backoff within one call
    assert any("503" in line and "retry 1/4" in line for line in lines)


def test_push_lost_commit_answer_is_not_committed_twice(ws):
    fake = FakeHub(fail={"create_commit_after": [httpx.ReadTimeout("answer lost")]})
    result = publish.publish_hub(publish.load_generations(ws), "org/name", api=fake, token=TOKEN,
                                 validate=lambda p: None, sleep=lambda s: None)
    assert len(fake.commits) == 2 and [s.commit for s in result.published] == [c["oid"] for c in fake.commits]
    assert fake.tags == {"gen-0001", "gen-0002"}


def test_push_persistent_failure_is_a_clear_error_without_the_token(ws):
    fake = FakeHub(fail={"create_commit": [http_error(502, f"echo Bearer {TOKEN}") for _ in range(10)]})
    with pytest.raises(publish.PublishError) as info:
        publish.publish_hub(publish.load_generations(ws), "org/name", api=fake, token=TOKEN,
                            validate=lambda p: None, sleep=lambda s: None, attempts=3)
    message = str(info.value)
    assert "org/name" in message and "gen-0001" in message and "after 3 attempts" in message and "502" in message
    assert TOKEN not in message and "<token>" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert fake.commits == [] and fake.tags == set()


def test_push_permanent_errors_are_not_retried(ws):
    fake = FakeHub(fail={"create_repo": [http_error(403, "forbidden")]})
    with pytest.raises(publish.PublishError, match="create_repo failed: .*403"):
        push(ws, fake)
    assert len(fake.calls) == 1
    fake = FakeHub()
    with pytest.raises(publish.PublishError, match="gen-0001/README.md failed: ValueError: bad YAML"):
        push(ws, fake, validate=lambda p: (_ for _ in ()).throw(ValueError("bad YAML")))
    assert fake.commits == []


def test_push_refuses_a_repository_it_did_not_write(ws):
    fake = FakeHub(files={".gitattributes", "README.md", "train.csv"})
    with pytest.raises(publish.PublishError, match="not written by `ratchet publish`"):
        push(ws, fake)
    assert fake.commits == []


def test_push_cli_never_shows_or_writes_the_token(ws, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fake, given = FakeHub(), []
    monkeypatch.setattr(publish, "make_api", lambda token: given.append(token) or fake)
    monkeypatch.setattr(publish, "validate_card", lambda path: None)
    r = cli("-w", str(ws), "--repo-id", "org/name", "--private")
    assert r.exit_code == 0, r.output
    assert given == [TOKEN]  # handed to HfApi, and nowhere else
    assert fake.calls[0][2]["private"] is True
    assert "2 generation(s) published, 0 skipped: https://huggingface.co/datasets/org/name" in r.output
    fake.fail["list_repo_refs"] = [http_error(401, f"invalid token {TOKEN}")]
    r = cli("-w", str(ws), "--repo-id", "org/name")
    assert r.exit_code == 1 and "list_repo_refs failed" in r.output
    assert TOKEN not in r.output
    for f in tmp_path.rglob("*"):
        assert not f.is_file() or TOKEN.encode() not in f.read_bytes(), f


def test_push_without_a_token_fails_before_any_network_call(ws, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(publish, "make_api", lambda token: pytest.fail("no HfApi without a token"))
    r = cli("-w", str(ws), "--repo-id", "org/name")
    assert r.exit_code == 1 and "no Hugging Face token" in r.output and "HF_TOKEN" in r.output


def test_push_dry_run_uploads_nothing(ws, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(publish, "make_api", lambda token: pytest.fail("a dry run makes no network call"))
    r = cli("-w", str(ws), "--repo-id", "org/name", "--dry-run")
    assert r.exit_code == 0, r.output
    sft2 = json.loads((ws / "generations/gen-0002/manifest.json").read_text())["splits"]["sft"]
    assert f"+ {sft2}" in r.output and "then tag gen-0002" in r.output
    assert "2 generation(s) would publish" in r.output and "no network call" in r.output


def test_bad_repo_id():
    with pytest.raises(publish.PublishError, match="expected ORG/NAME"):
        publish.publish_hub([], "not a repo id", dry_run=True)


# ------------------------------------------------------------------- a real build

@pytest.mark.slow
def test_publish_real_generation(built, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard, DatasetCardData

    src_ws, _summary = built
    gen1 = src_ws.generation_dir(1)
    manifest = json.loads((gen1 / "manifest.json").read_text())
    out = tmp_path / "out"
    r = cli("-w", str(src_ws.root), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert git(out, "tag", "--list").split() == ["gen-0001"]
    assert git(out, "log", "--format=%s").splitlines() == [
        f"Moral Ratchet generation 1: {manifest['counts']['sft_examples']} sft examples, "
        f"{manifest['counts']['dpo_pairs']} dpo pairs, "
        f"{manifest['counts']['annotations_accepted'] + manifest['counts']['annotations_rejected']} annotations"]
    assert "sft" in manifest["splits"]
    for split in manifest["splits"]:
        loaded = load_dataset(str(out), split, split="train", cache_dir=str(tmp_path / "cache"))
        expected = pq.read_table(split_path(gen1, split))
        assert loaded.num_rows == expected.num_rows > 0
        key = next(k for k in ("id", "passage_id", "annotator") if k in expected.column_names)
        assert loaded[key] == expected.column(key).to_pylist()
    card = DatasetCard.load(out / "README.md")
    assert isinstance(card.data, DatasetCardData)
    configs = {c["config_name"]: c["data_files"][0]["path"] for c in card.data.to_dict()["configs"]}
    assert configs == manifest["splits"]

    # a second generation from the same folder (no second model build): a copy with its number changed
    ws2 = tmp_path / "ws2"
    shutil.copytree(gen1, ws2 / "generations" / "gen-0001")
    shutil.copytree(gen1, ws2 / "generations" / "gen-0002")
    shutil.copy2(src_ws.config_path, ws2 / "ratchet.toml")
    m2 = ws2 / "generations" / "gen-0002" / "manifest.json"
    m2.write_text(json.dumps({**manifest, "generation": 2}), encoding="utf-8")
    out2 = tmp_path / "out2"
    r = cli("-w", str(ws2), "--out", str(out2))
    assert r.exit_code == 0, r.output
    assert git(out2, "tag", "--list").split() == ["gen-0001", "gen-0002"]
    assert len(git(out2, "log", "--format=%H").split()) == 2
    assert git(out2, "show", "gen-0002:manifest.json") == m2.read_text()
    assert cli("-w", str(ws2), "--out", str(out2)).output.count("already published") == 2


@pytest.mark.parametrize("licence", ["cc-by-4.0", ""])
def test_the_card_states_the_configured_licence_or_says_none_was_stated(tmp_path, licence):
    """No silent default licence (#15.9): publish.license goes into the card's metadata; without
    one the card says `unknown` and why, and `ratchet publish` warns."""
    from huggingface_hub import DatasetCard

    from builder.build import run_build
    from builder.workspace import Workspace

    from .conftest import SHORT_PASSAGES, write_workspace

    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES, annotator={"backend": "scripted", "model": "bundled:smollm2"},
                           publish={"license": licence})
    run_build(Workspace(root))
    card_path = root / "generations" / "gen-0001" / "README.md"
    card = DatasetCard.load(card_path)
    assert card.data.license == (licence or "unknown")
    assert ("No licence was stated" in card.text) == (not licence)
    r = cli("-w", str(root), "--out", str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert ("gen-0001 states no licence" in " ".join(r.output.split())) == (not licence)


def test_nothing_published_carries_a_local_absolute_path(tmp_path):
    """Splits, manifest and card of a build with a corpus and conscience items in the workspace:
    sources are relative to it (#15.9)."""
    from builder.build import run_build
    from builder.resources import EXAMPLES_DIR
    from builder.workspace import Workspace

    from .conftest import SHORT_PASSAGES, write_workspace

    root = write_workspace(tmp_path / "ws", SHORT_PASSAGES, annotator={"backend": "scripted", "model": "bundled:smollm2"},
                           conscience={"items": "items/scenario.jsonl", "exclude": {"split": "heldout"}})
    (root / "items").mkdir()
    shutil.copy2(EXAMPLES_DIR / "code_hacking" / "scenario.jsonl", root / "items" / "scenario.jsonl")  # as `init` does
    run_build(Workspace(root))
    gen = root / "generations" / "gen-0001"
    local = [str(tmp_path), str(EXAMPLES_DIR), str(Path.home())]
    texts = {"manifest.json": (gen / "manifest.json").read_text(), "README.md": (gen / "README.md").read_text()}
    for f in (gen / "data").glob("*.parquet"):
        texts[f.name] = json.dumps(pq.read_table(f).to_pylist(), default=str)
    for name, text in texts.items():
        assert not [p for p in local if p in text], name
    sft = pq.read_table(next((gen / "data").glob("sft-*.parquet"))).column("source").to_pylist()
    assert sft and all(s.startswith("corpus/c.jsonl:") for s in sft)
    # the dpo split's source column comes from here (whether the scripted judge kept a pair or not)
    con = Workspace(root).connect(read_only=True)
    items = [s for s, in con.execute("SELECT source FROM conscience_items").fetchall()]
    con.close()
    assert items and all(s.startswith("items/scenario.jsonl:") for s in items)
