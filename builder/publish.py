"""Publish: compiled generations out as a Hub-layout dataset repository.

Two targets share one plan. Each compiled generation that is not published yet becomes one
commit whose tree is exactly that generation's folder (README.md card, manifest.json, data/
parquet, any plot), replacing the previous generation's files, and one tag named like the
folder (`gen-0001`), so `ratchet diff gen-0001 gen-0002` and the tags use the same names.

- on disk (`--out DIR`): a git repository written with the git command line, with a fixed
  identity and fixed dates, so the same generations give the same commit hashes anywhere;
  `datasets.load_dataset(DIR, "sft")` reads the checked-out (newest) generation;
- on the Hub (`--repo-id ORG/NAME`): `huggingface_hub.HfApi`, one `create_commit` and one
  `create_tag` per generation, retrying transient failures.

A generation that already has its tag is skipped, so publishing again is idempotent; tags
are never moved. The token is handed to `HfApi` and nowhere else: it is never printed,
logged or written, and it is scrubbed from any error message shown.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .workspace import Workspace, WorkspaceError

TAG_PREFIX = "gen-"
MARKER_KEY = "ratchet.publish"  # set in the local repo's .git/config by `ratchet publish`
AUTHOR = ("Moral Ratchet", "ratchet@moral-ratchet.invalid")
EPOCH = 946684800  # 2000-01-01T00:00:00Z: commit N is dated EPOCH + N seconds, never the wall clock
# On disk the split files stay plain git blobs (no git-lfs needed to read or clone the folder,
# and `load_dataset` reads the working tree). The Hub keeps its own .gitattributes, which
# stores *.parquet and *.png through LFS; the API upload path does that for us.
LOCAL_GITATTRIBUTES = """\
# Written by `ratchet publish`. Every file is stored byte for byte (no end-of-line conversion),
# split files and plots as plain binary blobs (no LFS);
# the Hub repository (ratchet publish --repo-id) keeps the Hub's own .gitattributes (LFS).
* -text
*.parquet binary
*.png binary
"""
HUB_KEEP = {".gitattributes"}  # files of a Hub repo that a generation's commit never deletes
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class PublishError(Exception):
    pass


@dataclass
class Generation:
    number: int
    path: Path
    manifest: dict
    files: dict[str, int]  # path relative to the generation folder (posix) -> size in bytes

    @property
    def license(self) -> str:
        """The licence its card states (publish.license when it was built), "" when none."""
        return (((self.manifest.get("config") or {}).get("publish") or {}).get("license") or "").strip()

    @property
    def tag(self) -> str:
        return self.path.name  # gen-0001: the folder name

    @property
    def title(self) -> str:
        c = self.manifest.get("counts", {})
        return (f"Moral Ratchet generation {self.number}: {c.get('sft_examples', 0)} sft examples, "
                f"{c.get('dpo_pairs', 0)} dpo pairs, "
                f"{c.get('annotations_accepted', 0) + c.get('annotations_rejected', 0)} annotations")

    @property
    def body(self) -> str:
        c = self.manifest.get("counts", {})
        lines = [f"{k}: {v}" for k, v in sorted(c.items())]
        lines.append("splits: " + ", ".join(f"{k} -> {v}" for k, v in self.manifest["splits"].items()))
        if "config_hash" in self.manifest:
            lines.append(f"config_hash: {self.manifest['config_hash']}")
        return "\n".join(lines)


@dataclass
class Step:
    """What publishing one generation does (or did, or would do)."""
    generation: Generation
    action: str  # "publish" or "skip"
    reason: str = ""
    adds: dict[str, int] = field(default_factory=dict)  # path in repo -> size
    deletes: list[str] = field(default_factory=list)
    commit: str = ""  # the commit id, once made


@dataclass
class Result:
    target: str  # the folder or https URL
    steps: list[Step]
    dry_run: bool

    published = property(lambda self: [s for s in self.steps if s.action == "publish"])
    skipped = property(lambda self: [s for s in self.steps if s.action == "skip"])


# ---------------------------------------------------------------- reading the workspace

def read_generation(path: Path) -> Generation:
    """A compiled generation folder, checked: a manifest naming this generation and its
    splits, every split file present, a README.md card that parses as a DatasetCard whose
    configs point at those files. Nothing here needs the network."""
    from huggingface_hub import DatasetCard, DatasetCardData

    m = re.fullmatch(r"gen-(\d+)", path.name)
    if not m or not path.is_dir():
        raise PublishError(f"{path}: not a generation folder (expected generations/gen-NNNN/)")
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise PublishError(f"{manifest_path}: missing; this generation was not compiled completely: "
                           "rebuild it with `ratchet build --generation N`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublishError(f"{manifest_path}: unreadable manifest ({exc})") from None
    splits = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(splits, dict) or not splits or not all(isinstance(v, str) for v in splits.values()):
        raise PublishError(f"{manifest_path}: broken manifest: no 'splits' mapping split names to data files")
    if manifest.get("generation") != int(m.group(1)):
        raise PublishError(f"{manifest_path}: broken manifest: 'generation' is {manifest.get('generation')!r}, "
                           f"the folder says {int(m.group(1))}")
    files = {}
    for f in sorted(path.rglob("*")):
        rel = f.relative_to(path)
        if f.is_file() and not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = f.stat().st_size
    for split, rel in splits.items():
        if rel not in files:
            raise PublishError(f"{path / rel}: split '{split}' named in {manifest_path} is missing")
    card_path = path / "README.md"
    if "README.md" not in files:
        raise PublishError(f"{card_path}: missing dataset card")
    try:
        card = DatasetCard.load(card_path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the same user error
        raise PublishError(f"{card_path}: the dataset card does not parse: {exc}") from None
    configs = card.data.to_dict().get("configs") if isinstance(card.data, DatasetCardData) else None
    if not configs:
        raise PublishError(f"{card_path}: the dataset card has no 'configs' in its YAML metadata")
    for config in configs:
        for df in config.get("data_files", []):
            p = df.get("path") if isinstance(df, dict) else df
            if p not in files:
                raise PublishError(f"{card_path}: config '{config.get('config_name')}' points at {p}, "
                                   "which is not in the generation folder")
    return Generation(int(m.group(1)), path, manifest, files)


def load_generations(workspace: Path, only: int | None = None) -> list[Generation]:
    """The workspace's compiled generations in order (or only generation `only`), each checked."""
    try:
        ws = Workspace(workspace)
    except WorkspaceError as exc:
        raise PublishError(str(exc)) from None
    if only is not None:
        path = ws.generation_dir(only)
        if not path.is_dir():
            raise PublishError(f"{path}: generation {only} is not compiled; run `ratchet build --generation {only}`")
        return [read_generation(path)]
    folders = sorted(p for p in ws.generations_dir.glob("gen-*") if p.is_dir()) if ws.generations_dir.is_dir() else []
    if not folders:
        raise PublishError(f"{ws.generations_dir}: no compiled generation to publish; "
                           f"run `ratchet build --workspace {workspace}` first")
    gens = [read_generation(p) for p in folders]
    return sorted(gens, key=lambda g: g.number)


def plan(gens: list[Generation], tags: set[str], tree: set[str], keep: set[str], extra: dict[str, int] | None = None
         ) -> list[Step]:
    """One step per generation: skipped when its tag exists or when a newer generation is
    already published (main never goes back); otherwise the files to add and the files of
    the current tree to delete so the commit holds exactly this generation (plus `keep`)."""
    published = [int(t[len(TAG_PREFIX):]) for t in tags if re.fullmatch(TAG_PREFIX + r"\d+", t)]
    newest = max(published, default=0)
    steps = []
    for g in gens:
        if g.tag in tags:
            steps.append(Step(g, "skip", f"already published (tag {g.tag} exists)"))
            continue
        if g.number < newest:
            steps.append(Step(g, "skip", f"older than {TAG_PREFIX}{newest:04d}, which is published already"))
            continue
        adds = {**g.files, **(extra or {})}
        steps.append(Step(g, "publish", adds=adds, deletes=sorted(tree - set(adds) - keep)))
        tree, newest = set(adds) | (tree & keep), g.number
    return steps


# ---------------------------------------------------------------- local git repository

def _git_env(number: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    date = f"{EPOCH + number} +0000"
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0", LC_ALL="C",
               GIT_AUTHOR_NAME=AUTHOR[0], GIT_AUTHOR_EMAIL=AUTHOR[1], GIT_COMMITTER_NAME=AUTHOR[0],
               GIT_COMMITTER_EMAIL=AUTHOR[1], GIT_AUTHOR_DATE=date, GIT_COMMITTER_DATE=date)
    return env


def git(repo: Path, *args: str, number: int = 0, check: bool = True) -> str:
    """Run git in `repo` without the user's or the system's git config (fixed identity and date)."""
    _require_git()
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=_git_env(number))
    if check and proc.returncode != 0:
        raise PublishError(f"{repo}: git {' '.join(args[:2])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _require_git() -> None:
    if shutil.which("git") is None:
        raise PublishError("git is not installed (or not on PATH): `ratchet publish --out` writes a git repository "
                           "with the git command line; install git (or push with --repo-id, which does not need it)")


def _local_state(out: Path) -> tuple[bool, set[str], set[str]]:
    """(exists as a ratchet repo, its gen-* tags, the files tracked at HEAD); refuses anything
    that is not empty and was not written by `ratchet publish`."""
    if out.exists() and not out.is_dir():
        raise PublishError(f"{out}: exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return False, set(), set()
    if not (out / ".git").exists() or git(out, "config", "--get", MARKER_KEY, check=False).strip() != "true":
        raise PublishError(f"{out}: not empty and not a repository written by `ratchet publish`; "
                           "choose a new or empty folder for --out")
    branch = git(out, "symbolic-ref", "--short", "-q", "HEAD", check=False).strip()
    if branch != "main":
        raise PublishError(f"{out}: HEAD is not on branch main ({branch or 'detached'}); run `git -C {out} switch main`")
    if git(out, "status", "--porcelain", "--untracked-files=all").strip():
        raise PublishError(f"{out}: has uncommitted changes; publishing replaces the tree, so commit or drop them first "
                           f"(`git -C {out} reset --hard && git -C {out} clean -fd` drops them)")
    tags = set(git(out, "tag", "--list", f"{TAG_PREFIX}*").split())
    has_head = git(out, "rev-parse", "-q", "--verify", "HEAD", check=False).strip()
    tree = set(git(out, "ls-files", "-z").split("\0")) - {""} if has_head else set()
    return True, tags, tree


def _differs_from_tag(out: Path, g: Generation) -> bool:
    """Whether a published generation's folder changed since its tag (rebuilt after publishing)."""
    tagged = {}
    for line in git(out, "ls-tree", "-r", g.tag).splitlines():
        meta, path = line.split("\t", 1)
        tagged[path] = meta.split()[2]
    mine = git(out, "hash-object", "--no-filters", *[str(g.path / f) for f in g.files]).split() if g.files else []
    return {p: h for p, h in tagged.items() if p != ".gitattributes"} != dict(zip(g.files, mine))


def publish_local(gens: list[Generation], out: Path, dry_run: bool = False,
                  log: Callable[[str], None] = lambda _: None) -> Result:
    out = Path(out).absolute()
    _require_git()
    exists, tags, tree = _local_state(out)
    extra = {".gitattributes": len(LOCAL_GITATTRIBUTES.encode())}
    steps = plan(gens, tags, tree, keep=set(), extra=extra)
    for s in steps:
        if s.action == "skip" and s.generation.tag in tags and _differs_from_tag(out, s.generation):
            s.reason += "; its folder changed since (rebuilt after publishing): tags are never moved"
    if dry_run:
        return Result(str(out), steps, dry_run=True)
    if not exists and any(s.action == "publish" for s in steps):
        out.mkdir(parents=True, exist_ok=True)
        git(out, "init", "-q", "-b", "main")
        git(out, "config", MARKER_KEY, "true")
        git(out, "config", "core.autocrlf", "false")
    for s in steps:
        if s.action != "publish":
            continue
        g = s.generation
        head = git(out, "log", "-1", "--format=%s", check=False).strip()
        if head == g.title and not git(out, "tag", "--points-at", "HEAD").strip():
            # a run stopped between this generation's commit and its tag: tag it, never commit twice
            log(f"tagging {g.tag} (committed by a run that stopped before tagging)")
            git(out, "tag", "-a", g.tag, "-m", g.title, number=g.number)
            s.commit = git(out, "rev-parse", "HEAD").strip()
            continue
        log(f"committing {g.tag} ({len(s.adds)} files, {len(s.deletes)} deletion(s))")
        git(out, "rm", "-r", "-q", "--ignore-unmatch", "--", ".")
        for rel in g.files:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(g.path / rel, out / rel)
        (out / ".gitattributes").write_text(LOCAL_GITATTRIBUTES, encoding="utf-8", newline="\n")
        git(out, "add", "-A", "--", ".")
        git(out, "commit", "-q", "--allow-empty", "--no-verify", "-m", g.title, "-m", g.body, number=g.number)
        git(out, "tag", "-a", g.tag, "-m", g.title, number=g.number)
        s.commit = git(out, "rev-parse", "HEAD").strip()
    return Result(str(out), steps, dry_run=False)


# ---------------------------------------------------------------- the Hub

def resolve_token() -> str | None:
    """HF_TOKEN from the environment, else the token stored by `hf auth login`."""
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def make_api(token: str):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _transport_errors() -> tuple[type, ...]:
    """Connection errors and timeouts of whichever HTTP client huggingface_hub uses (httpx2 in
    2.x, httpx in 1.x, requests before), and of the standard library."""
    errors: list[type] = [ConnectionError, TimeoutError]
    for module, names in [("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))]:
        try:
            mod = __import__(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(errors)


def is_transient(exc: BaseException) -> bool:
    """Connection errors, timeouts, and HTTP 408/429/5xx: worth another try."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        return response is not None and response.status_code in RETRY_STATUS
    return isinstance(exc, _transport_errors())


def _retry_after(exc: BaseException) -> float:
    response = getattr(exc, "response", None)
    try:
        return float(response.headers.get("Retry-After", 0)) if response is not None else 0.0
    except (TypeError, ValueError):
        return 0.0


class Hub:
    """The push path around an HfApi-like object: every call retried on transient failures,
    the token scrubbed from every message that leaves."""

    def __init__(self, api, repo_id: str, token: str, attempts: int = 5, base_delay: float = 2.0,
                 max_delay: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 log: Callable[[str], None] = lambda _: None):
        self.api, self.repo_id, self._token = api, repo_id, token
        self.attempts, self.base_delay, self.max_delay, self.sleep, self.log = attempts, base_delay, max_delay, sleep, log

    def scrub(self, text: str) -> str:
        return text.replace(self._token, "<token>") if self._token else text

    def call(self, what: str, fn: Callable, *args, on_retry: Callable[[], object] | None = None, **kwargs):
        """fn(*args, **kwargs), retried with exponential backoff (and jitter) on transient
        failures; `on_retry`, when given, runs before each retry and may return the result
        (e.g. the commit did land although its answer was lost)."""
        for attempt in range(1, self.attempts + 1):
            try:
                if attempt > 1 and on_retry is not None:
                    done = on_retry()
                    if done is not None:
                        return done
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - classified below
                message = self.scrub(f"{type(exc).__name__}: {exc}".splitlines()[0])
                if not is_transient(exc):
                    raise PublishError(f"{self.repo_id}: {what} failed: {message}") from None
                if attempt == self.attempts:
                    raise PublishError(f"{self.repo_id}: {what} failed after {self.attempts} attempts "
                                       f"(last error: {message}); nothing more was changed, run the same "
                                       "command again to continue where it stopped") from None
                delay = min(self.max_delay, max(self.base_delay * 2 ** (attempt - 1), _retry_after(exc)))
                delay *= 1 + 0.1 * random.random()
                self.log(f"{what}: {message}; retry {attempt}/{self.attempts - 1} in {delay:.0f} s")
                self.sleep(delay)


def validate_card(path: Path) -> None:
    """The Hub's own YAML check (a network call)."""
    from huggingface_hub import DatasetCard

    DatasetCard.load(path).validate(repo_type="dataset")


def publish_hub(gens: list[Generation], repo_id: str, private: bool | None = None, dry_run: bool = False,
                api=None, token: str | None = None, validate: Callable[[Path], None] | None = None,
                sleep: Callable[[float], None] | None = None, attempts: int = 5,
                log: Callable[[str], None] = lambda _: None) -> Result:
    """Push the generations to the dataset repository `repo_id`, one commit and one tag each.

    A dry run makes no network call and needs no token: it lists every generation as the
    Hub would receive it if none were published yet (the tags already there are read only
    by a real push, which skips them)."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise PublishError(f"--repo-id {repo_id!r}: expected ORG/NAME, e.g. my-org/moral-ratchet")
    url = f"https://huggingface.co/datasets/{repo_id}"
    if dry_run:
        return Result(url, plan(gens, set(), set(), keep=HUB_KEEP), dry_run=True)
    token = token or resolve_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN (a token with write access) or run `hf auth login`; "
                           f"nothing was sent to {repo_id}")
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    validate = validate or validate_card
    hub = Hub(api if api is not None else make_api(token), repo_id, token, attempts=attempts,
              sleep=sleep or time.sleep, log=log)
    a = hub.api
    hub.call("create_repo", a.create_repo, repo_id, repo_type="dataset", private=private, exist_ok=True)
    refs = hub.call("list_repo_refs", a.list_repo_refs, repo_id, repo_type="dataset")
    tags = {t.name for t in refs.tags}
    tree = set(hub.call("list_repo_files", a.list_repo_files, repo_id, repo_type="dataset"))
    if not any(t.startswith(TAG_PREFIX) for t in tags) and tree - HUB_KEEP - {"README.md"}:
        raise PublishError(f"{repo_id}: the dataset repository holds files but no {TAG_PREFIX}* tag, so it was not "
                           "written by `ratchet publish`; publishing would replace its files: use a new --repo-id")
    steps = plan(gens, tags, tree, keep=HUB_KEEP)
    todo = [s for s in steps if s.action == "publish"]
    for s in todo:  # every card checked by the Hub before anything is uploaded
        hub.call(f"validating {s.generation.tag}/README.md", validate, s.generation.path / "README.md")
    for s in todo:
        g = s.generation
        ops = [CommitOperationDelete(path_in_repo=p) for p in s.deletes]
        ops += [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(g.path / rel)) for rel in g.files]
        log(f"pushing {g.tag} ({len(g.files)} files, {len(s.deletes)} deletion(s))")

        def landed(title=g.title):  # a commit whose answer was lost may have landed: never commit twice
            head = hub.call("list_repo_commits", a.list_repo_commits, repo_id, repo_type="dataset")
            return head[0] if head and head[0].title == title else None

        info = hub.call(f"commit of {g.tag}", a.create_commit, repo_id, ops, commit_message=g.title,
                        commit_description=g.body, repo_type="dataset", on_retry=landed)
        s.commit = getattr(info, "oid", None) or getattr(info, "commit_id", "")
        hub.call(f"tag {g.tag}", a.create_tag, repo_id, tag=g.tag, tag_message=g.title, revision=s.commit or None,
                 repo_type="dataset", exist_ok=True)
    return Result(url, steps, dry_run=False)
