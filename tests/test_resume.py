"""A build killed with `kill -9` resumes without repeating a finished model call."""
import os
import signal
import subprocess
import sys
import time

from builder.build import run_build
from builder.compile import split_path
from builder.workspace import Workspace

from .conftest import write_workspace

PASSAGES = [f"Report {i}: the mayor of Town {i} claims crime fell by {10 + i} percent after new lights." for i in range(6)]


def test_killed_build_resumes_from_the_cache(tmp_path):
    root = write_workspace(tmp_path / "ws", PASSAGES, sampling={"max_tokens": 256}, annotate={"retries": 0})
    log = root / "logs" / "build-gen-0001.log"
    proc = subprocess.Popen([sys.executable, "-m", "builder.cli", "build", "--workspace", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    finished_calls = 0
    while time.time() < deadline and proc.poll() is None:
        finished_calls = log.read_text().count(" call ") if log.exists() else 0
        if finished_calls >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert finished_calls >= 2

    summary = run_build(Workspace(root))  # the kernel released the lock with the process
    assert summary["cached_calls"] >= finished_calls
    audits = summary["audit"]["sampled"]  # the sample depends on the workspace's random secret
    assert summary["cached_calls"] + summary["model_calls"] == len(PASSAGES) + audits
    assert summary["model_calls"] <= len(PASSAGES) + audits - finished_calls
    assert split_path(root / "generations" / "gen-0001", "sft").exists()
    assert not list((root / "generations").glob(".gen-*"))  # no half-written generation left behind
    con = Workspace(root).connect(read_only=True)
    statuses = [r[0] for r in con.execute("SELECT status FROM builds ORDER BY started_at").fetchall()]
    assert statuses == ["interrupted", "finished"]
