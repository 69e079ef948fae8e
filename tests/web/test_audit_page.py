"""`ratchet audit serve` in a real browser: Playwright driving Debian's chromium against the
page served on loopback, over a workspace made by a real `ratchet build` on SmolLM2 (the
suite's shared real build, rebuilt with every annotation sampled and a passage carrying
markup). Screenshots of the queue and the statistics go to $RATCHET_SCREENSHOTS when set
(docs/images holds the ones the docs show)."""
import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from builder.cli import app
from builder.workspace import Workspace

from ..conftest import write_workspace

pytestmark = pytest.mark.slow
MARKUP = ('The mayor promised <script>window.__pwned = 1</script> lower taxes next year '
          '<img src=x onerror="window.__pwned = 2"> but published no budget figures.')
RATCHET = [sys.executable, "-c", "from builder.cli import app; app()"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    if os.environ.get("CI"):  # CI installs chromium (make install): a missing browser is a failure there
        raise RuntimeError("chromium is not installed: run `make install` (it apt-get installs it)")
    pytest.skip("chromium is not installed (make install puts it there)", allow_module_level=True)

from playwright.sync_api import expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def golden(built, tmp_path_factory):
    """The shared real build, plus a passage with markup, rebuilt with `ratchet build` so that
    every accepted annotation is in the audit sample (audited by the real model auditor too)."""
    source, _ = built
    root = tmp_path_factory.mktemp("audit-web") / "ws"
    shutil.copytree(source.root, root)
    with open(root / "corpus" / "c.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"text": MARKUP}) + "\n")
    write_workspace(root, None, sampling={"max_tokens": 384}, audit={"rate": 1.0, "auditor": "bundled:smollm2"})
    result = CliRunner().invoke(app, ["build", "--workspace", str(root), "--overwrite"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def ws(golden, tmp_path):
    """A fresh copy per test: each starts with no human verdicts."""
    shutil.copytree(golden, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, ws, **options):
        import uvicorn

        from builder.web.app import AuditServer, ServeConfig

        self.port = free_port()
        self.server = AuditServer(ws, ServeConfig(port=self.port, **options))
        self.base = f"http://127.0.0.1:{self.port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.server.app(), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.uvicorn.started:
                break
            time.sleep(0.05)

    def url(self, who: str) -> str:
        return next(u for w, u in self.server.start_urls() if w.split(" ")[0] == who)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(10)


@pytest.fixture
def serve(ws):
    running = []

    def start(**options):
        running.append(Running(ws, **options))
        return running[-1]

    yield start
    for r in running:
        r.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def sample_keys(ws) -> dict[str, tuple[str, str]]:
    """passage text -> (passage id, annotator) of the sampled items (every accepted annotation)."""
    con = ws.connect(read_only=True)
    rows = con.execute("""SELECT p.text, a.passage_id, a.annotator FROM annotations a JOIN passages p USING (passage_id)
                          WHERE a.generation = 1 AND a.status = 'accepted'""").fetchall()
    con.close()
    return {text: (pid, annotator) for text, pid, annotator in rows}


def human_audits(ws, auditor=None):
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT item, annotator, auditor, verdict, wrong_claims, reasons FROM audits "
                       "WHERE auditor_kind = 'human'" + (" AND auditor = ?" if auditor else ""),
                       [auditor] if auditor else []).fetchall()
    con.close()
    return rows


def screenshot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("RATCHET_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def press(page, key: str) -> None:
    """A key that submits a form or follows a link: wait for the page it leads to."""
    with page.expect_navigation():
        page.keyboard.press(key)


def current_passage(page) -> str:
    return page.locator("#passage").inner_text()


def test_an_auditor_works_through_the_queue_with_the_keyboard_only(ws, serve, browser, tmp_path):
    keys = sample_keys(ws)
    assert MARKUP in keys, "the passage with markup has no accepted annotation to audit"
    server = serve(auditors=("ana",), overlap=0.0)
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    page.goto(server.url("ana"))
    expect(page.locator("#progress")).to_have_text(f"done 0 / {len(keys)}")
    screenshot(page, "audit-queue.png", tmp_path)
    expected = {}
    for n in range(len(keys)):
        expect(page.locator("#progress")).to_have_text(f"done {n} / {len(keys)}")
        key = keys[current_passage(page)]
        if n == 0:  # claim 1 wrong, then fail
            page.keyboard.press("1")
            expect(page.locator("#claim-1")).to_be_checked()
            press(page, "f")
            expected[key] = ("fail", [1])
        else:
            press(page, "p")
            expected[key] = ("pass", [])
        page.wait_for_load_state()
    expect(page.locator("#finished")).to_contain_text(f"{len(keys)} of {len(keys)}")
    stored = {(item, annotator): (verdict, json.loads(wrong)) for item, annotator, _, verdict, wrong, _ in human_audits(ws)}
    assert stored == expected  # exactly those verdicts, nothing else
    con = ws.connect(read_only=True)
    assert con.execute("SELECT count(*) FROM audit_items WHERE by_human").fetchone()[0] == len(keys)
    con.close()


def test_undo_reload_and_skip(ws, serve, browser):
    keys = sample_keys(ws)
    server = serve(auditors=("ana",), overlap=0.0)
    page = browser.new_page()
    page.goto(server.url("ana"))
    first = current_passage(page)
    press(page, "p")
    expect(page.locator("#progress")).to_have_text(f"done 1 / {len(keys)}")
    second = current_passage(page)
    assert second != first
    press(page, "f")
    expect(page.locator("#progress")).to_have_text(f"done 2 / {len(keys)}")
    press(page, "u")  # undo the fail: back on the second item, its verdict gone
    expect(page.locator("#progress")).to_have_text(f"done 1 / {len(keys)}")
    assert current_passage(page) == second
    assert [(r[0], r[3]) for r in human_audits(ws)] == [(keys[first][0], "pass")]
    page.reload()  # a reload shows the same item; the queue resumes at the first open one
    assert current_passage(page) == second
    page.goto(server.base + "/queue")
    assert current_passage(page) == second
    press(page, "s")  # skip: the next item now, the skipped one at the end
    third = current_passage(page)
    assert third not in (first, second)
    press(page, "k")  # previous, then next again
    press(page, "j")
    assert current_passage(page) == third
    page.keyboard.press("?")
    expect(page.locator("#help")).to_be_visible()
    expect(page.locator("#help")).to_contain_text("undo your last verdict")
    # Revise the first item's pass to a fail typed with a reason (Enter in the reason submits
    # nothing), then undo: the pass comes back, not nothing.
    page.goto(server.base + "/queue")
    while current_passage(page) != first:
        press(page, "k")
    expect(page.locator(".note")).to_contain_text("pass")
    page.fill("#reason", "claim 2 is not in the passage")
    page.press("#reason", "Enter")
    page.wait_for_timeout(300)
    assert [(r[0], r[3]) for r in human_audits(ws)] == [(keys[first][0], "pass")]  # Enter stored nothing
    page.keyboard.press("Escape")
    press(page, "f")
    assert [(r[0], r[3], json.loads(r[5])) for r in human_audits(ws)] == [
        (keys[first][0], "fail", ["claim 2 is not in the passage"])]
    press(page, "u")
    assert [(r[0], r[3]) for r in human_audits(ws)] == [(keys[first][0], "pass")]
    assert current_passage(page) == first


def test_a_pass_with_a_ticked_claim_is_refused_in_the_page_and_codes_and_reason_have_keys(ws, serve, browser, tmp_path):
    """#31.5/6: the page refuses a pass with a wrong claim before sending it (no request, so no
    draft and no reload); shift+digit toggles a reason code and r types a reason, of the claim
    ticked last while it is ticked (its box shows only then), else of the whole reflection."""
    keys = sample_keys(ws)
    server = serve(auditors=("ana",), overlap=0.0)
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    page.goto(server.url("ana"))
    first = current_passage(page)
    sent = []
    page.on("request", lambda r: sent.append(r.url) if r.method == "POST" else None)
    page.keyboard.press("1")
    page.keyboard.press("p")
    expect(page.locator("#client-error")).to_be_visible()
    expect(page.locator("#client-error")).to_contain_text("A pass names no wrong claim: untick claim 1")
    assert sent == [] and human_audits(ws) == [] and current_passage(page) == first
    expect(page.locator("#claim-1-reasons")).to_be_visible()  # claim 1 is ticked: its codes and reason show
    page.keyboard.press("Shift+Digit2")
    expect(page.locator("#claim-1-code-2")).to_be_checked()
    expect(page.locator("#code-2")).not_to_be_checked()
    page.keyboard.press("Shift+Digit2")
    expect(page.locator("#claim-1-code-2")).not_to_be_checked()
    page.keyboard.press("Shift+Digit1")
    page.keyboard.press("r")
    expect(page.locator("#claim-1-reason")).to_be_focused()
    expect(page.locator("#claim-1-reason")).to_have_value("")  # the r that focused it is not typed
    page.keyboard.type("the passage never says it")
    page.keyboard.press("Escape")
    page.keyboard.press("1")  # unticked: its box hides and the keys act on the whole reflection
    expect(page.locator("#claim-1-reasons")).to_be_hidden()
    page.keyboard.press("Shift+Digit5")
    expect(page.locator("#code-5")).to_be_checked()
    page.keyboard.press("r")
    expect(page.locator("#reason")).to_be_focused()
    page.keyboard.type("off topic")
    page.keyboard.press("Escape")
    page.keyboard.press("1")  # ticked again: what was given for it is still there
    expect(page.locator("#claim-1-code-1")).to_be_checked()
    screenshot(page, "audit-claim-reasons.png", tmp_path)
    press(page, "f")
    assert [(r[0], r[3], json.loads(r[4]), json.loads(r[5])) for r in human_audits(ws)] == [
        (keys[first][0], "fail", [1], ["not about this passage", "off topic"])]
    con = ws.connect(read_only=True)
    stored = con.execute("SELECT claim_reasons FROM audits WHERE auditor = 'ana'").fetchone()[0]
    by_claim = con.execute("SELECT claim, wrong, codes, reason FROM audit_claims WHERE auditor = 'ana' "
                           "ORDER BY claim").fetchall()
    con.close()
    assert json.loads(stored) == [{"claim": 1, "codes": ["invented claim"], "reason": "the passage never says it"}]
    assert by_claim[0] == (1, True, ["invented claim"], "the passage never says it")
    assert all(not wrong and codes is None for _, wrong, codes, _ in by_claim[1:])


def test_two_auditors_on_the_overlap_and_the_statistics(ws, serve, browser, tmp_path):
    keys = sample_keys(ws)
    server = serve(auditors=("ana", "ben"), overlap=1.0)  # every item to both: all of it is overlap
    assert {a: len(q) for a, q in server.server.queues.items()} == {"ana": len(keys), "ben": len(keys)}
    pages = {}
    for who in ("ana", "ben"):
        pages[who] = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
        pages[who].goto(server.url(who))
    orders, last_url = {who: [] for who in pages}, {}
    for n in range(len(keys)):  # interleaved, each verdict written as it comes: neither overwrites the other
        for who, page in pages.items():
            orders[who].append(current_passage(page))
            last_url[who] = page.url
            press(page, "f" if (who == "ben" and n == 0) else "p")
    assert sorted(orders["ana"]) == sorted(orders["ben"]) == sorted(keys)
    rows = human_audits(ws)
    assert len(rows) == 2 * len(keys) and {r[2] for r in rows} == {"ana", "ben"}
    ben_failed = keys[orders["ben"][0]]
    assert {(r[0], r[1]) for r in rows if r[2] == "ben" and r[3] == "fail"} == {ben_failed}
    page = pages["ana"]
    expect(page.locator("#finished")).to_be_visible()
    page.click("#stats-link")
    page.wait_for_load_state("load")  # images included
    expect(page.locator("#agreement")).to_contain_text("person vs person")
    agree = page.locator("#agreement tr").nth(2).locator("td")
    assert agree.nth(1).inner_text() == str(len(keys)) and agree.nth(2).inner_text() == str(len(keys) - 1)
    expect(page.locator("#by-annotator")).to_contain_text("smollm2")
    expect(page.locator("#reputation")).to_contain_text("before")
    assert page.locator("#ratchet-plot").evaluate("img => img.complete && img.naturalWidth > 0")
    # Having seen per-annotator figures, the session judges no more (a changed verdict would
    # move them and name the item's author).
    page.goto(last_url["ana"])
    press(page, "f")
    expect(page.locator("#message")).to_contain_text("no longer blind")
    assert len(human_audits(ws)) == 2 * len(keys) and {r[3] for r in human_audits(ws, "ana")} == {"pass"}
    screenshot(page, "audit-stats.png", tmp_path)


@pytest.fixture(scope="module")
def golden_critiques(golden, tmp_path_factory):
    """The golden build with the grounding verifier in the ensemble, rebuilt: each accepted
    annotation gets a critique (the verifier's: no model call, so the annotations stay the cached
    SmolLM2 ones), every critique is in the audit sample (rate 1.0) and the model auditor
    (SmolLM2) audits each. The critic is named `zeta-critic`, which no page may show (a name
    no passage or reflection uses, so that its absence means the page never names it)."""
    root = tmp_path_factory.mktemp("audit-web-critiques") / "ws"
    shutil.copytree(golden, root)
    write_workspace(root, None, sampling={"max_tokens": 384}, audit={"rate": 1.0, "auditor": "bundled:smollm2"},
                    ensemble={"k": 0, "members": [{"name": "smollm2", "persona": "default"},
                                                  {"kind": "verifier", "name": "zeta-critic"}]})
    result = CliRunner().invoke(app, ["build", "--workspace", str(root), "--overwrite"])
    assert result.exit_code == 0, result.output
    return root


def critique_keys(ws) -> list[tuple[str, str, str]]:
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT passage_id, annotator, critic FROM critiques WHERE generation = 1 "
                       "AND status = 'accepted'").fetchall()
    con.close()
    return rows


def human_critique_audits(ws):
    con = ws.connect(read_only=True)
    rows = con.execute("SELECT item, annotator, critic, auditor, verdict, wrong_claims, reasons FROM critique_audits "
                       "WHERE auditor_kind = 'human' ORDER BY ALL").fetchall()
    con.close()
    return rows


def test_a_critique_whose_critic_abstained_leads_the_queue_and_says_why(golden_critiques, tmp_path):
    """#30.5 and #31.4: a critic too unsure to vote puts its critique, not the annotation, first on
    the page, with its doubt shown and the critic unnamed. The escalated critique is the last one
    in the queue's order before, so the order is the escalation's."""
    shutil.copytree(golden_critiques, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    before = Running(ws, auditors=("ana",))
    try:
        queue = before.server.queues["ana"]
    finally:
        before.stop()
    last = next(x for x in reversed(queue) if len(x.key) == 3)  # (item, annotator, critic): a critique
    assert last is not queue[0] and not any(x.needs_person for x in queue)
    item, annotator, critic = last.key
    why = "the critic was unsure of its verdict (survives 0.48, reject 0.30, revise 0.22): its vote was left out"
    con = ws.connect()
    con.execute("INSERT INTO escalations (item, annotator, generation, judge, p, reason, in_sample, critic) "
                "VALUES (?, ?, 1, ?, 0.59, ?, true, ?)", [item, annotator, critic, why, critic])
    con.close()
    running = Running(ws, auditors=("ana",))
    try:
        assert running.server.queues["ana"][0].key == (item, annotator, critic)
        client = session(running)
        page = client.get(client.get("/queue").headers["location"]).text
        assert f"Needs a person:</b> {why}" in page
        assert critic not in page and "A critique to check." in page
    finally:
        running.stop()


def test_two_auditors_audit_critiques_too_with_the_keyboard(golden_critiques, tmp_path, browser):
    """#31.4: the page serves the critique sample beside the annotation sample: the passage, the
    reflection, what the critic said of each claim (never who it is); p/f say whether the critique
    was right, 1-9 tick the claims it got wrong; right with a ticked claim is refused; undo takes a
    critique verdict back; verdicts land in critique_audits and move the critic's figures."""
    shutil.copytree(golden_critiques, tmp_path / "ws")
    ws = Workspace(tmp_path / "ws")
    annotations, critiques = sample_keys(ws), critique_keys(ws)
    assert critiques and {c for _, _, c in critiques} == {"zeta-critic"}
    running = Running(ws, auditors=("ana", "ben"), overlap=1.0)  # every item to both
    try:
        total = len(annotations) + len(critiques)
        assert {a: len(q) for a, q in running.server.queues.items()} == {"ana": total, "ben": total}
        pages = {}
        for who in ("ana", "ben"):
            pages[who] = browser.new_context(viewport={"width": 1100, "height": 1000}).new_page()
            pages[who].goto(running.url(who))
        seen = {who: 0 for who in pages}  # critiques judged
        for n in range(total):
            for who, page in pages.items():
                expect(page.locator("#progress")).to_have_text(f"done {n} / {total}")
                if page.locator("#critique-task").count() == 0:  # a reflection: pass it
                    press(page, "p")
                    continue
                html_text = page.content()
                assert "zeta" not in html_text.lower()
                expect(page.locator("#critic-claim-1")).to_contain_text("the critic called it")
                seen[who] += 1
                if who == "ben" and seen[who] == 1:  # right with a ticked claim: refused in the page, nothing sent
                    page.keyboard.press("1")
                    page.keyboard.press("p")
                    expect(page.locator("#client-error")).to_contain_text("Right names no claim the critic got wrong")
                    assert human_critique_audits(ws) == [r for r in human_critique_audits(ws) if r[3] != "ben"]
                    screenshot(page, "audit-critique.png", tmp_path)
                    press(page, "f")  # claim 1 misjudged: wrong
                    expect(page.locator("#progress")).to_have_text(f"done {n + 1} / {total}")
                    press(page, "u")  # undo it: the same critique again, its verdict gone
                    expect(page.locator("#progress")).to_have_text(f"done {n} / {total}")
                    assert [r for r in human_critique_audits(ws) if r[3] == "ben"] == []
                    page.keyboard.press("1")
                    page.fill("#reason", "claim 1 is in the passage")
                    page.keyboard.press("Escape")
                press(page, "f" if who == "ben" and seen[who] == 1 else "p")
        for page in pages.values():
            expect(page.locator("#finished")).to_contain_text(f"{total} of {total}")
        rows = human_critique_audits(ws)
        assert len(rows) == 2 * len(critiques) and {r[3] for r in rows} == {"ana", "ben"}
        wrong = [r for r in rows if r[4] == "wrong"]
        assert len(wrong) == 1 and wrong[0][3] == "ben" and json.loads(wrong[0][5]) == [1]
        assert json.loads(wrong[0][6]) == ["claim 1 is in the passage"]
        assert all(r[5] is None for r in rows if r[4] == "right")
        assert len(human_audits(ws)) == 2 * len(annotations)  # the reflections' verdicts, apart
        con = ws.connect(read_only=True)
        human = con.execute("SELECT sum(human_audits) FROM critique_audit_rate_by_critic WHERE critic = 'zeta-critic'").fetchone()
        con.close()
        assert human == (2 * len(critiques),)
        page = pages["ana"]
        page.click("#stats-link")
        page.wait_for_load_state("load")
        table = page.locator("#by-critic")
        expect(table).to_contain_text("zeta-critic")
        human_row = table.locator("tr", has_text="human").locator("td")
        assert human_row.nth(2).inner_text() == str(2 * len(critiques))
        assert human_row.nth(3).inner_text() == str(2 * len(critiques) - 1)
    finally:
        running.stop()


def test_nothing_served_names_an_author_model_persona_or_item(ws, serve, browser):
    server = serve(auditors=("ana",), overlap=0.0)
    con = ws.connect(read_only=True)
    members = con.execute("SELECT name, family, persona, model FROM members").fetchall()
    ids = [r[0] for r in con.execute("SELECT passage_id FROM passages").fetchall()]
    con.close()
    forbidden = {v for name, family, persona, model in members
                 for v in (name, family, model, Path(model).name, Path(model).stem, persona)
                 if v and v != "default"}  # "default" is the empty persona: a common word, no identity
    forbidden |= set(ids) | {"gen-0001", "generation"}
    bodies, urls = [], []
    page = browser.new_page()
    page.on("response", lambda r: (urls.append(r.url), bodies.append(r.text() if r.status != 303 else "")))
    page.goto(server.url("ana"))
    for _ in sample_keys(ws):
        press(page, "p")
    expect(page.locator("#finished")).to_be_visible()
    page.goto(server.base + "/item/0123456789abcdef0123")  # an error page says no more than the others
    expect(page.locator("#message")).to_contain_text("No such item")
    served = "\n".join(bodies + urls)
    assert len(bodies) > 5
    for word in forbidden:
        assert word.lower() not in served.lower(), f"{word!r} reached the page"
    assert not re.search(r"\b0\.\d{2,}", "\n".join(bodies))  # no score


def test_markup_in_a_passage_is_text_and_runs_nothing(ws, serve, browser):
    server = serve(auditors=("ana",), overlap=0.0)
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url("ana"))
    for _ in sample_keys(ws):
        if current_passage(page) == MARKUP:
            break
        press(page, "s")
    assert current_passage(page) == MARKUP  # shown as the characters it is
    assert page.locator("#passage script, #passage img").count() == 0
    assert page.evaluate("window.__pwned") is None and not errors


def session(server, who="ana") -> httpx.Client:
    """An HTTP client holding `who`'s session cookie (the start token traded for it)."""
    r = httpx.get(server.url(who), follow_redirects=False)
    assert r.status_code == 303
    return httpx.Client(base_url=server.base, cookies=r.cookies, follow_redirects=False)


def test_tokens_cookie_host_csrf_and_origin(ws, serve):
    server = serve(auditors=("ana", "ben"), overlap=1.0)  # both have every item: ana's queue is never short
    base = server.base
    assert httpx.get(base + "/start?token=wrong").status_code == 403
    assert httpx.get(base + "/start").status_code == 403
    assert httpx.get(base + "/queue").status_code == 403  # no session cookie
    url = server.url("ana")
    first = httpx.get(url, follow_redirects=False)
    assert first.status_code == 303
    cookie = first.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert httpx.get(url, follow_redirects=False).status_code == 403  # the token works once
    # DNS rebinding: a foreign Host header is refused
    assert httpx.get(base + "/queue", headers={"Host": "attacker.example"}).status_code == 400
    client = httpx.Client(base_url=base, cookies=first.cookies, follow_redirects=False)
    item = client.get("/queue").headers["location"]
    page = client.get(item)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "access-control-allow-origin" not in page.headers
    preflight = client.options(item + "/verdict", headers={"Origin": "http://attacker.example",
                                                          "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    good_origin = {"Origin": base}
    refused = [client.post(item + "/verdict", data={"verdict": "pass"}, headers=good_origin),  # no CSRF token
               client.post(item + "/verdict", data={"verdict": "pass", "csrf": "x" * 43}, headers=good_origin),
               client.post(item + "/verdict", data={"verdict": "pass", "csrf": csrf},  # cross-origin
                           headers={"Origin": "http://attacker.example"}),
               client.post(item + "/verdict", data={"verdict": "pass", "csrf": csrf})]  # no Origin at all
    assert [r.status_code for r in refused] == [403] * 4
    assert human_audits(ws) == []
    # Another auditor's session can use neither ana's CSRF token nor her item ids (ids are per session).
    ben = session(server, "ben")
    assert ben.post(item + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=good_origin).status_code == 403
    ben_csrf = re.search(r'name="csrf" value="([^"]+)"', ben.get(ben.get("/queue").headers["location"]).text).group(1)
    assert ben.post(item + "/verdict", data={"verdict": "pass", "csrf": ben_csrf}, headers=good_origin).status_code == 404
    assert ben.get(item).status_code == 404
    ok = client.post(item + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=good_origin)
    assert ok.status_code == 303 and len(human_audits(ws, "ana")) == 1
    # A verdict that breaks the audit schema is refused with the reason, and nothing is stored.
    item2 = client.get("/queue").headers["location"]
    bad = client.post(item2 + "/verdict", data={"verdict": "fail", "csrf": csrf, "reason": "no"}, headers=good_origin)
    assert bad.status_code == 303 and bad.headers["location"] == item2  # Post/Redirect/Get: a reload posts nothing
    assert "A reason is 3 to 120 characters; yours has 2." in client.get(item2).text
    assert len(human_audits(ws, "ana")) == 1
    # Input that is not what the form sends is refused, not a server error.
    odd = [client.post(item2 + "/verdict", data={"verdict": "fail", "csrf": csrf, "claims": "\u00b2"}, headers=good_origin),
           client.post(item2 + "/verdict", data={"verdict": "maybe", "csrf": csrf}, headers=good_origin),
           client.post(item2 + "/verdict", data={"verdict": "pass", "csrf": "\u00e9"}, headers=good_origin),
           client.get("/start?token=%C3%A9")]
    assert [r.status_code for r in odd] == [303, 303, 403, 403] and len(human_audits(ws, "ana")) == 1
    # The statistics would unblind the queue: closed until it is done, the plot too.
    assert client.get("/stats").status_code == 403 and client.get("/stats/ratchet.png").status_code == 403
    # A link preview (HEAD) does not use up a start token.
    cat = serve(auditors=("cat",)).url("cat")
    assert httpx.head(cat).status_code == 200 and httpx.get(cat, follow_redirects=False).status_code == 303


def test_only_the_statistics_button_ends_a_sessions_verdicts(ws, serve):
    """A GET or HEAD of /stats (a link preview, a prefetch, a typed URL) shows the done page again
    and closes nothing; the done page's button (a POST with the CSRF token) opens the statistics."""
    server = serve(auditors=("ana",))
    client = session(server)
    origin = {"Origin": server.base}
    while (where := client.get("/queue")).status_code == 303:
        item = where.headers["location"]
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(item).text).group(1)
        assert client.post(item + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=origin).status_code == 303
    assert client.head("/stats").status_code == 200
    shown = client.get("/stats", headers={"Sec-Purpose": "prefetch"})
    assert shown.status_code == 200 and 'id="open-stats"' in shown.text and "Audit statistics" not in shown.text
    # Still blind: a verdict can be changed.
    csrf = re.search(r'name="csrf" value="([^"]+)"', shown.text).group(1)
    assert client.post(item + "/verdict", data={"verdict": "fail", "csrf": csrf, "reason": "changed my mind"},
                       headers=origin).status_code == 303
    assert client.post("/stats", data={"csrf": "x" * 43}, headers=origin).status_code == 403  # no forged click
    opened = client.post("/stats", data={"csrf": csrf}, headers=origin)
    assert opened.status_code == 303 and "Audit statistics" in client.get("/stats").text
    closed = client.post(item + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=origin)
    assert closed.status_code == 403 and "no longer blind" in closed.text


def test_a_verdict_on_a_reflection_rebuilt_since_the_page_loaded_is_refused_and_shown_anew(ws, serve):
    """#31.1: the page loads its sample once; a rebuild then changes a reflection. A verdict on
    the old text stores nothing (409) and the page shows the text as it is now, under the same id;
    a verdict given before the change is stale (not done, not counted) and the item comes back;
    an item the rebuild rejected leaves the queue. Changes are made in SQL, as `build --overwrite`
    would rewrite the rows, so that the test knows which text changed."""
    server = serve(auditors=("ana",))
    client = session(server)
    origin = {"Origin": server.base}
    first = client.get("/queue").headers["location"]
    page = client.get(first)
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    assert client.post(first + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=origin).status_code == 303
    second = client.get("/queue").headers["location"]
    shown = client.get(second).text
    keys = sample_keys(ws)
    text = shown_passage(shown)
    first_key = keys[shown_passage(page.text)]
    con = ws.connect()
    con.execute("UPDATE annotations SET record = json_merge_patch(record, '{\"reflection\": \"Rewritten by a rebuild.\"}') "
                "WHERE generation = 1 AND passage_id = ? AND annotator = ?", list(keys[text]))
    con.execute("UPDATE annotations SET record = json_merge_patch(record, '{\"reflection\": \"Also rewritten.\"}') "
                "WHERE generation = 1 AND passage_id = ? AND annotator = ?", list(first_key))
    con.close()
    refused = client.post(second + "/verdict", data={"verdict": "fail", "csrf": csrf, "reason": "judged the old text"},
                          headers=origin)
    assert refused.status_code == 303 and refused.headers["location"] == second
    again = client.get(second).text
    assert "changed since the page loaded it" in again and "Rewritten by a rebuild." in again
    assert [a[:4] for a in human_audits(ws, "ana")] == [(*first_key, "ana", "pass")]  # nothing stored for it
    # the verdict on the first item judged text that is gone: stale, so the item is open again
    con = ws.connect(read_only=True)
    assert con.execute("SELECT item, annotator FROM audits_stale WHERE auditor = 'ana'").fetchall() == [first_key]
    con.close()
    assert client.post(second + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=origin).status_code == 303
    assert client.get("/queue").headers["location"] == first  # offered again, as it reads now
    assert "Also rewritten." in client.get(first).text
    # a reflection the rebuild rejected leaves the queue
    con = ws.connect()
    con.execute("UPDATE annotations SET status = 'rejected' WHERE generation = 1 AND passage_id = ? AND annotator = ?",
                list(first_key))
    con.close()
    total = len(server.server.queues["ana"])
    gone = client.post(first + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=origin)
    assert gone.status_code == 409 and "no longer in the audit sample" in gone.text
    assert client.get(first).status_code == 404
    assert f"/ {total - 1}" in client.get(client.get("/queue").headers["location"]).text


def test_a_refused_verdict_keeps_the_form_and_says_why_in_the_auditors_words(ws, serve):
    """#31.5: a refused verdict redirects to the item (a reload resubmits nothing), which says why
    in plain words, once, with the ticks, codes and reason as the auditor left them; a 1 MB reason
    is not echoed back; claim numbers are checked against the item's own claims, and a pass
    with ticked wrong claims is refused. Nothing is stored until the verdict is right."""
    server = serve(auditors=("ana",))
    client = session(server)
    origin = {"Origin": server.base}
    item = client.get("/queue").headers["location"]
    page = client.get(item).text
    assert "3–120 characters" in page and 'maxlength="120"' in page
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    n_claims = len(re.findall(r'name="claims" value="', page))
    huge = "x" * 1_000_000

    def post(**form):
        r = client.post(item + "/verdict", data={"csrf": csrf, **form}, headers=origin)
        assert r.status_code == 303 and r.headers["location"] == item
        return client.get(item).text

    shown = post(verdict="fail", claims=["1"], codes=["invented claim"], reason=huge)
    assert "yours has 1000000" in shown and len(shown) < 30_000
    assert 'value="' + "x" * 120 + '"' in shown and "x" * 121 not in shown
    assert re.search(r'id="claim-1"\s+checked', shown) and 'value="invented claim" checked' in shown
    reloaded = client.get(item).text
    assert "yours has" not in reloaded and re.search(r'id="claim-1"\s+checked', reloaded)  # said once, kept
    assert f"numbered 1 to {n_claims}" in post(verdict="fail", claims=[str(n_claims + 1)])
    assert "A pass names no wrong claim" in post(verdict="pass", claims=["1"])
    assert human_audits(ws, "ana") == []
    # a claim's own reason is bounded alike, and kept with its codes when refused
    shown = post(verdict="fail", claims=["1"], **{"claim-codes-1": ["evidence not in passage"], "claim-reason-1": "ab"})
    assert "The reason for claim 1 is 3 to 120 characters; yours has 2." in shown
    assert re.search(r'id="claim-1-code-2" value="evidence not in passage"\s+checked', shown)
    assert re.search(r'id="claim-1-reason"[^>]*value="ab"', shown)
    assert human_audits(ws, "ana") == []
    done = client.post(item + "/verdict", data={"csrf": csrf, "verdict": "fail", "claims": ["1"],
                                                "reason": "misquotes the passage",
                                                "claim-codes-1": ["evidence not in passage", "no such code"],
                                                "claim-reason-2": "not ticked: not meant"}, headers=origin)
    assert done.status_code == 303 and done.headers["location"] == "/queue"
    assert [a[3:] for a in human_audits(ws, "ana")] == [("fail", "[1]", '["misquotes the passage"]')]
    con = ws.connect(read_only=True)
    assert json.loads(con.execute("SELECT claim_reasons FROM audits WHERE auditor = 'ana'").fetchone()[0]) == [
        {"claim": 1, "codes": ["evidence not in passage"]}]
    con.close()


def test_a_finished_queue_can_be_revisited_and_undo_outlives_a_restart(ws, serve):
    """#31.5: the done page lists every item with its verdict; one can be opened and changed. After
    the server restarts (a new session, no history in memory), undo takes back the auditor's latest
    verdict from the audits table: the one changed last, not the last of the queue (a replaced
    verdict's audited_at is the time it was replaced)."""
    server = serve(auditors=("ana",))
    client = session(server)
    origin = {"Origin": server.base}
    order = []
    while (where := client.get("/queue")).status_code == 303:
        order.append(where.headers["location"])
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get(order[-1]).text).group(1)
        assert client.post(order[-1] + "/verdict", data={"verdict": "pass", "csrf": csrf}, headers=origin).status_code == 303
    done = where.text
    assert re.findall(r'<a href="(/item/[0-9a-f]+)">item \d+</a> \(reflection\): pass', done) == order
    first = order[0]
    assert "You gave this item <b>pass</b>" in client.get(first).text
    changed = client.post(first + "/verdict", data={"verdict": "fail", "csrf": csrf, "reason": "misreads it"},
                          headers=origin)
    assert changed.status_code == 303 and f'<a href="{first}">item 1</a> (reflection): fail' in client.get("/queue").text
    server.stop()
    restarted = serve(auditors=("ana",))
    again = session(restarted)
    page = again.get("/queue")
    assert page.status_code == 200 and 'id="done-items"' in page.text  # the same queue, done
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    undone = again.post("/undo", data={"csrf": csrf}, headers={"Origin": restarted.base})
    assert undone.status_code == 303
    rows = human_audits(ws, "ana")
    assert len(rows) == len(order) - 1 and all(verdict == "pass" for _, _, _, verdict, _, _ in rows)
    assert again.get("/queue").headers["location"] == undone.headers["location"]  # the undone item is open again


def shown_passage(page: str) -> str:
    """The passage an item page shows, as text (its evidence marks and escaping undone)."""
    inner = re.search(r'<pre id="passage"[^>]*>(.*?)</pre>', page, re.S).group(1)
    return html.unescape(re.sub(r"<[^>]+>", "", inner))


def test_each_claims_evidence_is_marked_in_the_passage_and_a_quote_it_lacks_is_said(ws, serve):
    """#31.6: the page marks where each claim's quote stands in the passage (the text is the same,
    only marked), and says so of a quote the passage does not hold (an older build's, or one an
    engine could not constrain; here one claim's evidence is rewritten in SQL to make one)."""
    keys = sample_keys(ws)
    con = ws.connect()
    rows = con.execute("SELECT passage_id, annotator, record FROM annotations WHERE generation = 1 "
                       "AND status = 'accepted'").fetchall()
    for pid, annotator, record in rows:  # every item: its first quote is its passage's first sentence
        record = json.loads(record)
        text = next(t for t, k in keys.items() if k == (pid, annotator))
        record["claims"][0]["evidence"] = text.split(". ")[0]
        if len(record["claims"]) > 1:
            record["claims"][1]["evidence"] = "a sentence no passage of the corpus holds"
        con.execute("UPDATE annotations SET record = ? WHERE generation = 1 AND passage_id = ? AND annotator = ?",
                    [json.dumps(record), pid, annotator])
    con.close()
    server = serve(auditors=("ana",))
    client = session(server)
    page = client.get(client.get("/queue").headers["location"]).text
    passage = shown_passage(page)
    assert passage in keys  # marking changed no character
    marked = re.findall(r'<mark class="evidence-span" title="evidence of claim ([\d, ]+)">(.*?)</mark>', page, re.S)
    assert marked and marked[0][0].startswith("1") and passage.startswith(html.unescape(marked[0][1]))
    claims = page.count('name="claims" value="')
    assert page.count("not in the passage</strong>") == (1 if claims > 1 else 0)


def test_a_slow_request_does_not_stall_another_auditor(ws, serve, monkeypatch):
    """Handlers run off the event loop: while the admin's plot takes two seconds to draw, an
    auditor's next item still comes (before, every handler ran on the loop, one at a time)."""
    import builder.web.app as page

    drawing = threading.Event()

    def slow_plot(rows):
        drawing.set()
        time.sleep(2.0)
        return b"png"

    monkeypatch.setattr(page, "ratchet_plot", slow_plot)
    server = serve(auditors=("ana",), admin=True)
    admin = httpx.get(server.url("admin"), follow_redirects=False)
    plot = threading.Thread(target=lambda: httpx.get(server.base + "/stats/ratchet.png", cookies=admin.cookies))
    plot.start()
    assert drawing.wait(10)
    ana = session(server)
    assert ana.get("/queue").status_code == 303  # answered while the plot is still drawing
    assert plot.is_alive()
    plot.join(10)


def test_the_command_prints_links_and_serves(ws):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*RATCHET, "audit", "serve", "-w", str(ws.root), "--port",
                             str(port), "--auditor", "ana", "--auditor", "ben", "--admin"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        while len([x for x in lines if "/start?token=" in x]) < 3:
            line = proc.stdout.readline()
            assert line, "".join(lines)
            lines.append(line)
        urls = dict(re.match(r"(\w+).*?: (http\S+)", x).groups() for x in lines if "/start?token=" in x)
        assert set(urls) == {"ana", "ben", "admin"} and all(f"127.0.0.1:{port}" in u for u in urls.values())
        for _ in range(100):
            try:
                r = httpx.get(urls["admin"], follow_redirects=True)
                break
            except httpx.ConnectError:
                time.sleep(0.1)
        assert r.status_code == 200 and "Audit statistics" in r.text  # an admin sees the statistics at once
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    with socket.create_server(("127.0.0.1", 0)) as busy:  # a port in use: a clear error, no traceback
        taken = subprocess.run([*RATCHET, "audit", "serve", "-w", str(ws.root), "--port", str(busy.getsockname()[1])],
                               capture_output=True, text=True, timeout=60)
    assert taken.returncode == 1 and "cannot listen on 127.0.0.1" in taken.stderr + taken.stdout


def test_an_item_a_judge_abstained_on_leads_the_queue_and_says_why(ws, serve):
    """#30.5: escalations (a judge too unsure to decide) come first, with the judge's doubt shown.
    The escalated item is one that did not lead the queue before, so the order is the escalation's."""
    keys = sample_keys(ws)
    client = session(serve(auditors=("ana",)))
    before = shown_passage(client.get(client.get("/queue").headers["location"]).text)
    assert "Needs a person" not in client.get(client.get("/queue").headers["location"]).text
    text, (pid, annotator) = next((t, k) for t, k in sorted(keys.items()) if t != before)
    con = ws.connect()
    con.execute("INSERT INTO escalations (item, annotator, generation, judge, p, reason, in_sample) "
                "VALUES (?, ?, 1, 'claim judge', 0.55, "
                "'the claim judge was unsure of claim 1: P(unsupported) 0.55', true)", [pid, annotator])
    con.close()
    client = session(serve(auditors=("ana",)))
    page = client.get(client.get("/queue").headers["location"]).text
    assert shown_passage(page) == text
    assert "Needs a person:</b> the claim judge was unsure of claim 1: P(unsupported) 0.55" in page
    assert annotator not in page.split('id="needs-person"')[1].split("</p>")[0]  # blind: a judge, not an author
