"""Enter an auditor's verdicts through the audit page itself, keyboard only, in Chromium.

A person who reads a build's secret sample outside the page (long passages are easier to read
side by side) can enter what they decided through `ratchet audit serve`, exactly as a person at
the page does: the page is started on loopback, each item is matched to a verdict by its
passage, the wrong claims are ticked with the digit keys, the reasons typed in the page's own
fields, and `p` or `f` submits. What lands in DuckDB is what the page stores (auditor_kind =
'human', the content hash of what was shown, per-claim reasons), so a typo or a rule of the
page (a pass with a ticked claim, a reason of 2 characters) is refused as it would be for a
person. docs/faithfulness.md ("Audited through the page") reports the audit entered this way.

The verdict file is JSONL, one row per sampled reflection:
  {"passage_id": ..., "annotator": ..., "verdict": "pass"|"fail", "wrong_claims": [2],
   "claim_reasons": {"2": "a fragment with no claim"}, "reason": "what else is wrong"}
An item with no row stops the run (nothing is guessed); it can be rerun, the page resumes.

Usage: python bench/page_audit.py WORKSPACE VERDICTS.jsonl [--auditor NAME] [--port 8799]
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

from builder.workspace import Workspace

CHROMIUM = "/usr/bin/chromium"


def sampled_passages(root: Path, generation: int) -> dict[str, tuple[str, str]]:
    """passage text -> (passage id, annotator) of generation's accepted annotations."""
    con = Workspace(root).connect(read_only=True)
    rows = con.execute("""SELECT p.text, a.passage_id, a.annotator FROM annotations a JOIN passages p USING (passage_id)
                          WHERE a.generation = ? AND a.status = 'accepted'""", [generation]).fetchall()
    con.close()
    return {text: (pid, annotator) for text, pid, annotator in rows}


def start_page(root: Path, auditor: str, port: int, generation: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(["ratchet", "audit", "serve", "-w", str(root), "--auditor", auditor, "--overlap", "0",
                             "--port", str(port), "--generation", str(generation)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(line, end="")
        if m := re.search(rf"(http://127\.0\.0\.1:{port}/start\S+)", line):
            return proc, m.group(1)
    raise SystemExit(f"ratchet audit serve exited ({proc.wait()}) before printing a start link")


def enter(page, verdict: dict) -> None:
    for n in verdict.get("wrong_claims", []):
        page.locator("#passage").click()  # out of the last claim's reason field: a digit there is typed, not a key
        page.keyboard.press(str(n))  # ticks claim n and opens its own reason field
        if reason := verdict.get("claim_reasons", {}).get(str(n)):
            page.fill(f"#claim-{n}-reason", reason)
    if verdict.get("reason"):
        page.fill("#reason", verdict["reason"])
    page.locator("#passage").click()  # out of the text fields, so that p / f are keys, not letters
    with page.expect_navigation():
        page.keyboard.press("p" if verdict["verdict"] == "pass" else "f")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("verdicts", type=Path)
    ap.add_argument("--auditor", default="engineer")
    ap.add_argument("--port", type=int, default=8799)
    ap.add_argument("--generation", type=int, default=1)
    args = ap.parse_args()
    by_passage = sampled_passages(args.workspace, args.generation)
    with open(args.verdicts, encoding="utf-8") as fh:
        verdicts = {(v["passage_id"], v["annotator"]): v for v in map(json.loads, filter(str.strip, fh))}
    proc, url = start_page(args.workspace, args.auditor, args.port, args.generation)
    entered = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(url)
            while page.locator("#finished").count() == 0:
                if page.locator("#critique-task").count():
                    print("a critique is next in the queue: enter it by hand (this script enters reflections)",
                          file=sys.stderr)
                    return 1
                key = by_passage[page.locator("#passage").inner_text()]
                if key not in verdicts:
                    print(f"no verdict for passage {key[0]} by {key[1]} in {args.verdicts}", file=sys.stderr)
                    return 1
                enter(page, verdicts[key])
                entered += 1
            browser.close()
    finally:
        proc.terminate()
        proc.wait()
    print(f"entered {entered} verdict(s) through the page as {args.auditor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
