"""The audit page: Starlette, server-rendered Jinja2 templates and one small script, no build
step and nothing from a CDN. It reads and writes the workspace's DuckDB through the same
validated path as `ratchet audit import` (stages/audit.py: parse_human_row, store_audits,
refresh_reputations), one short connection per request, writes under the workspace lock, so a
build and the page never write at once and a closed tab loses nothing already submitted.

Security (docs/audit-page.md): loopback by default; Host header checked against exactly the
origin the server prints (web/origin.py: DNS rebinding); a
one-time start token exchanged for an HttpOnly, SameSite=Strict cookie; a CSRF token and an
Origin check on every POST; a strict Content-Security-Policy; no CORS; every model output
escaped by the templates. The audit secret and item identities never reach a page.
"""
from __future__ import annotations

import hmac
import inspect
import logging
import secrets
import threading
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..prompts import Prompts
from ..resources import load_schema
from ..stages.audit import (AUDITS, CRITIQUE_AUDITS, SampledCritique, StaleContent, current_annotations,
                            current_critiques, load_secret, parse_human_critique_row, parse_human_row,
                            refresh_reputations, refuse_model_names, store_audits, store_critique_audits,
                            withdraw_audit, withdraw_critique_audit)
from ..workspace import Workspace, WorkspaceError, transaction
from .evidence import segments
from .origin import CheckHost, OriginPolicy
from .queue import AuditorQueue, Item, Key, assign, load_critiques, load_sample, reload
from .stats import ratchet_plot, ratchet_rows, stats

HERE = Path(__file__).parent
BUSY = "The workspace is busy (a build is writing it). Nothing was lost; try again in a moment."
CHANGED = ("This {what} changed since the page loaded it (the workspace was rebuilt): your verdict was not saved. "
           "Here is the text as it is now; please judge it again.")
GONE = ("This {what} is no longer in the audit sample (a rebuild rejected or removed it): your verdict was not "
        "saved. Go on with the next item.")
log = logging.getLogger("ratchet.audit_page")
_REASON = load_schema("audit")["properties"]["reasons"]["items"]
REASON_LENGTH = (_REASON["minLength"], _REASON["maxLength"])  # the schema's, said in the form
# The codes a person may give, for the whole reflection or for one wrong claim: the schema's.
REASON_CODES = tuple(load_schema("claim_reasons")["items"]["properties"]["codes"]["items"]["enum"])
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    generation: int = 1
    auditors: tuple[str, ...] = ("auditor",)
    overlap: float = 0.2
    admin: bool = False
    allowed_origins: tuple[str, ...] = ()  # a reverse proxy's or LAN name's origin, besides the printed one


class AuditServer:
    """The state of one `ratchet audit serve`: the queue of each auditor, the one-time start
    tokens and the sessions they became."""

    def __init__(self, ws: Workspace, config: ServeConfig):
        self.ws, self.config = ws, config
        self.generation = config.generation
        secret = load_secret(ws.root)
        try:  # a workspace an older builder made gets today's tables and views (stale verdicts) now
            with ws.lock():
                ws.connect().close()
        except (WorkspaceError, duckdb.Error):
            pass  # a build is writing: it brings them itself
        con = ws.connect(read_only=True)
        try:
            refuse_model_names(con, list(config.auditors), ws.config)
            items: list[Item] = [*load_sample(con, secret, config.generation, ws.config.audit.rate),
                                 *load_critiques(con, secret, config.generation, ws.config.audit.rate)]
        finally:
            con.close()
        self.total_sampled = len(items)
        self.sampled_critiques = sum(isinstance(x, SampledCritique) for x in items)
        by_key = {x.key: x for x in items}
        assigned = assign(sorted(by_key), list(config.auditors), secret, config.overlap,
                          lead=[k for k, x in by_key.items() if x.needs_person])  # load_sample's order
        self.queues = {a: [by_key[k] for k in keys] for a, keys in assigned.items()}
        self.tokens: dict[str, tuple[str, bool]] = {secrets.token_urlsafe(24): (a, False) for a in config.auditors}
        if config.admin:
            self.tokens[secrets.token_urlsafe(24)] = ("admin", True)
        self.sessions: dict[str, AuditorQueue] = {}
        self._lock = threading.Lock()
        cfg = ws.config
        self.prompts = Prompts(ws.resolve(cfg.annotate.prompts) if cfg.annotate.prompts else None)
        self.policy = OriginPolicy(config.host, config.port, config.allowed_origins)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescape on for .html

    # ------------------------------------------------------------ plumbing

    def start_urls(self) -> list[tuple[str, str]]:
        return [(who + (" (admin: stats only)" if admin else ""), f"{self.policy.printed}/start?token={t}")
                for t, (who, admin) in self.tokens.items()]

    @contextmanager
    def db(self, write: bool):
        """One short connection, under the workspace lock when writing (a build holds it while
        it runs: the page then answers 503 and loses nothing)."""
        with self._lock, ExitStack() as stack:
            try:
                if write:
                    stack.enter_context(self.ws.lock())
                con = stack.enter_context(closing(self.ws.connect(read_only=not write)))
            except (WorkspaceError, duckdb.Error):  # never echo it: the message names paths and pids
                raise Refused(503, BUSY) from None
            yield con

    @property
    def cookie(self) -> str:
        """Cookies are shared by every port of a host: the name carries the port, so two servers
        (or another local service) never see or overwrite this one's session."""
        return f"ratchet_audit_{self.config.port}"

    def session(self, request: Request) -> AuditorQueue:
        session = self.sessions.get(request.cookies.get(self.cookie, ""))
        if session is None:
            raise Refused(403, "No session: open the start link that `ratchet audit serve` printed.")
        return session

    async def posted(self, request: Request) -> tuple[AuditorQueue, object]:
        """The session and form of a POST, after its checks: CSRF token and Origin on every POST
        (a page on another origin cannot submit for you). A session that has seen the statistics
        judges no more: changing a verdict and watching the per-annotator figures move would
        tell who wrote the item."""
        session = self.session(request)
        form = await request.form()
        if session.saw_stats:
            raise Refused(403, "You have seen the statistics, so this session is no longer blind: verdicts are closed.")
        if not self.policy.origin_ok(request.scope, request.headers.get("origin")):
            raise Refused(403, "Refused: this form was not sent from the audit page (Origin).")
        if not hmac.compare_digest(str(form.get("csrf", "")).encode(), session.csrf.encode()):
            raise Refused(403, "Refused: the form's CSRF token is missing or wrong; reload the page.")
        return session, form

    def item_of(self, request: Request, session: AuditorQueue):
        x = session.by_id.get(request.path_params["id"])
        if x is None:
            raise Refused(404, "No such item in your queue.")
        return x

    def verdicts(self, con, session: AuditorQueue) -> list[tuple[Key, str]]:
        """This auditor's current verdicts on the items of their queue, annotations and critiques,
        the latest last (a verdict on text a rebuild has changed since is stale: not here)."""
        rows = con.execute("""SELECT key, verdict FROM (
                                  SELECT [item, annotator] AS key, verdict, audited_at FROM audits_current
                                  WHERE generation = $g AND auditor = $a AND auditor_kind = 'human'
                                  UNION ALL
                                  SELECT [item, annotator, critic], verdict, audited_at FROM critique_audits_current
                                  WHERE generation = $g AND auditor = $a AND auditor_kind = 'human')
                              ORDER BY audited_at""", {"g": self.generation, "a": session.auditor}).fetchall()
        return [(tuple(key), v) for key, v in rows if tuple(key) in session.by_key]

    def done(self, con, session: AuditorQueue) -> dict[Key, str]:
        """This auditor's verdict on each item of their queue that has a current one (the item of a
        stale one is offered again)."""
        return dict(self.verdicts(con, session))

    def page(self, request: Request, name: str, status: int = 200, **values) -> Response:
        return self.templates.TemplateResponse(request, name, values, status_code=status)

    # ------------------------------------------------------------ routes

    def start(self, request: Request) -> Response:
        token = request.query_params.get("token", "")
        if request.method == "HEAD":  # a link preview must not use up the token
            return Response(status_code=200)
        found = next((t for t in self.tokens if hmac.compare_digest(t.encode(), token.encode())), None)
        if found is None:
            raise Refused(403, "This link is not valid: it was used already, or it is wrong. "
                               "Each start link works once; restart `ratchet audit serve` for new ones.")
        auditor, admin = self.tokens.pop(found)
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = AuditorQueue(auditor, [] if admin else list(self.queues[auditor]), admin=admin)
        response = RedirectResponse("/stats" if admin else "/queue", status_code=303)
        response.set_cookie(self.cookie, session_id, httponly=True, samesite="strict", path="/")
        return response

    def queue(self, request: Request) -> Response:
        session = self.session(request)
        with self.db(write=False) as con:
            done = self.done(con, session)
        nxt = session.next_open(done)
        if nxt is None:
            return self.done_page(request, session, done)
        return RedirectResponse(f"/item/{session.opaque(nxt)}", status_code=303)

    def done_page(self, request: Request, session: AuditorQueue, done: dict[Key, str]) -> Response:
        """Every item with this auditor's verdict, each a link to open and change it (until the
        statistics are opened)."""
        items = [{"id": session.opaque(x), "number": i, "verdict": done.get(x.key),
                  "what": "critique" if isinstance(x, SampledCritique) else "reflection"}
                 for i, x in enumerate(session.items, 1)]
        return self.page(request, "done.html", done=len(done), total=len(session.items), csrf=session.csrf,
                         items=items, can_undo=bool(session.history or done))

    def item(self, request: Request) -> Response:
        session = self.session(request)
        x = self.item_of(request, session)
        with self.db(write=False) as con:
            done = self.done(con, session)
            now = reload(con, x, self.generation)
        if now is None:
            session.drop(x.key)
            raise Refused(409, GONE.format(what=what(x)))
        if now.content_hash != x.content_hash:  # a rebuild since the page loaded: show the text as it is now
            session.replace(x := now)
        i = session.position(x)
        neighbour = lambda j: session.opaque(session.items[j]) if 0 <= j < len(session.items) else None  # noqa: E731
        draft = session.drafts.get(x.key, {})
        error = draft.pop("error", None)  # a refusal is said once; the ticks and text stay until a verdict
        marked, found = segments(x.passage, x.record["claims"])
        values = dict(id=session.opaque(x), passage=x.passage, draft=draft, marked=marked, found=found,
                      reason_length=REASON_LENGTH, reflection=self.prompts.reflection(x.record), claims=x.record["claims"],
                      done=len(done), total=len(session.items), number=i + 1, csrf=session.csrf,
                      previous=done.get(x.key), prev_id=neighbour(i - 1), next_id=neighbour(i + 1), error=error,
                      can_undo=bool(session.history or done), needs_person=x.needs_person)
        if isinstance(x, SampledCritique):  # the critic is never named: only what it wrote
            return self.page(request, "critique.html", critique=x.critique, **values)
        return self.page(request, "item.html", codes=REASON_CODES, **values)

    async def verdict(self, request: Request) -> Response:
        session, form = await self.posted(request)
        return await run_in_threadpool(self._verdict, request, session, form)

    def _verdict(self, request: Request, session: AuditorQueue, form) -> Response:
        x = self.item_of(request, session)
        critique = isinstance(x, SampledCritique)
        codes = [] if critique else [c for c in form.getlist("codes") if c in REASON_CODES]
        text = str(form.get("reason", "")).strip()
        claims = form.getlist("claims")
        verdict = str(form.get("verdict", ""))
        # codes and a reason under each claim of a reflection (shown once it is ticked); an unticked claim's are not meant
        per_claim = [] if critique else claims
        claim_codes = {n: [c for c in form.getlist(f"claim-codes-{n}") if c in REASON_CODES] for n in per_claim}
        claim_text = {n: str(form.get(f"claim-reason-{n}", "")).strip() for n in per_claim}

        def refused(why: str) -> Response:
            """Post/Redirect/Get: the form is kept as a draft (the reason cut to its longest: a huge
            one is not echoed back) and the item's page says why; a reload resubmits nothing."""
            ticks = [] if why == CHANGED.format(what=what(x)) else claims  # the claims may be others now
            session.drafts[x.key] = {
                "claims": ticks, "codes": codes, "error": why, "reason": text[:REASON_LENGTH[1]],
                "claim_codes": {n: claim_codes[n] for n in ticks if n in claim_codes},
                "claim_reason": {n: claim_text[n][:REASON_LENGTH[1]] for n in ticks if n in claim_text}}
            return RedirectResponse(f"/item/{session.opaque(x)}", status_code=303)

        problem = form_problem(verdict, claims, text, len(x.record["claims"]), claim_text, critique=critique)
        if problem:
            return refused(problem)
        row = {"item": x.item, "annotator": x.annotator, "generation": self.generation, "content_hash": x.content_hash,
               "verdict": verdict, "reasons": ([", ".join(codes)] if codes else []) + ([text] if text else []),
               "wrong_claims": claims}
        if critique:
            row["critic"] = x.critic
        else:
            row["claim_reasons"] = [{"claim": int(n), **({"codes": claim_codes[n]} if claim_codes[n] else {}),
                                     **({"reason": claim_text[n]} if claim_text[n] else {})}
                                    for n in claims if claim_codes[n] or claim_text[n]]
        with self.db(write=True) as con:
            try:
                previous = self._store(con, session, x, row)
            except StaleContent:  # the item's page shows the text as it is now (item() reloads it)
                return refused(CHANGED.format(what=what(x)))
            except ValueError as exc:  # what form_problem does not foresee: the schema's words
                return refused(str(exc))
        session.history.append((x.key, previous))
        session.skipped.discard(x.key)
        session.drafts.pop(x.key, None)
        return RedirectResponse("/queue", status_code=303)

    def _store(self, con, session: AuditorQueue, x: Item, row: dict):
        """Check a verdict against the text now, under the lock (a rebuild since the page loaded may
        have changed it), through the path `ratchet audit import` takes, and store it; the person's
        verdict it replaced (None: there was none) comes back for undo."""
        key = [*x.key, self.generation]
        if isinstance(x, SampledCritique):
            now = current_critiques(con, "AND c.passage_id = ? AND c.annotator = ? AND c.critic = ? AND c.generation = ?",
                                    key)
            parse, table, store = parse_human_critique_row, CRITIQUE_AUDITS, store_critique_audits
            where = "item = ? AND annotator = ? AND critic = ? AND generation = ?"
        else:
            now = current_annotations(con, "AND a.passage_id = ? AND a.annotator = ? AND a.generation = ?", key)
            parse, table, where = parse_human_row, AUDITS, "item = ? AND annotator = ? AND generation = ?"
            store = lambda con, rows: store_audits(con, self.generation, rows)  # noqa: E731
        if tuple(key) not in now:
            session.drop(x.key)
            raise Refused(409, GONE.format(what=what(x)))
        audit = parse(row, session.auditor, now)
        previous = table.read(con, f"{where} AND auditor = ? AND auditor_kind = 'human'", [*key, session.auditor])
        with transaction(con):
            store(con, [audit])
            refresh_reputations(con, self.generation)
        return previous[0] if previous else None

    async def skip(self, request: Request) -> Response:
        session, _ = await self.posted(request)
        x = self.item_of(request, session)
        session.skipped.add(x.key)
        return RedirectResponse("/queue", status_code=303)

    async def undo(self, request: Request) -> Response:
        """Take back this session's last verdict: the row leaves `audits`, coverage and
        reputation are recomputed, and the item is shown again."""
        session, _ = await self.posted(request)
        return await run_in_threadpool(self._undo, session)

    def _undo(self, session: AuditorQueue) -> Response:
        """This session's last verdict, the one it replaced put back; with none (a restarted
        server, a new start link), the auditor's latest verdict in `audits` or `critique_audits`
        (by audited_at)."""
        with self.db(write=True) as con:
            if session.history:
                key, previous = session.history[-1]
            elif not session.by_key:
                return RedirectResponse("/queue", status_code=303)
            else:
                given = self.verdicts(con, session)
                if not given:
                    return RedirectResponse("/queue", status_code=303)
                key, previous = given[-1][0], None
            withdraw = withdraw_critique_audit if len(key) == 3 else withdraw_audit
            with transaction(con):
                withdraw(con, *key, self.generation, session.auditor, previous)
                refresh_reputations(con, self.generation)
        if session.history:
            session.history.pop()  # only once it is undone: a busy workspace (503) keeps it for the next try
        return RedirectResponse(f"/item/{session.opaque(session.by_key[key])}", status_code=303)

    def _may_see_stats(self, con, session: AuditorQueue) -> None:
        if not session.admin and len(self.done(con, session)) < len(session.items):
            raise Refused(403, "The statistics open when your queue is done (they would unblind it).")

    def stats_page(self, request: Request) -> Response:
        """The statistics, once this session has asked for them by the done page's button (a POST):
        a GET, a HEAD or a browser's prefetch only shows that page again and closes nothing."""
        session = self.session(request)
        with self.db(write=False) as con:
            self._may_see_stats(con, session)
            if not (session.saw_stats or session.admin):
                return self.done_page(request, session, self.done(con, session))
            figures = stats(con, self.generation)
        return self.page(request, "stats.html", **figures)

    async def open_stats(self, request: Request) -> Response:
        """The explicit click that opens the statistics and so ends this session's verdicts."""
        session = self.session(request)
        if not session.saw_stats:
            session, _ = await self.posted(request)
            await run_in_threadpool(self._check_may_see_stats, session)
            session.saw_stats = True
        return RedirectResponse("/stats", status_code=303)

    def _check_may_see_stats(self, session: AuditorQueue) -> None:
        with self.db(write=False) as con:
            self._may_see_stats(con, session)

    def plot(self, request: Request) -> Response:
        session = self.session(request)
        with self.db(write=False) as con:
            self._may_see_stats(con, session)
            rows = ratchet_rows(con)
        return Response(ratchet_plot(rows), media_type="image/png")  # drawn outside the database lock

    # ------------------------------------------------------------ the app

    def app(self) -> Starlette:
        def guarded(handler):
            async def endpoint(request: Request):
                try:  # DuckDB and matplotlib block: off the event loop, so one slow request stalls no other
                    if inspect.iscoroutinefunction(handler):
                        return await handler(request)
                    return await run_in_threadpool(handler, request)
                except Refused as exc:
                    return self.page(request, "message.html", exc.status, message=exc.message)
                except Exception:  # logged here; the page says nothing that could name an item or a path
                    log.exception("audit page: %s %s", request.method, request.url.path)
                    return self.page(request, "message.html", 500, message="Something went wrong on the server; "
                                     "your earlier verdicts are saved.")
            return endpoint

        routes = [Route("/start", guarded(self.start), methods=["GET", "HEAD"]), Route("/queue", guarded(self.queue)),
                  Route("/item/{id}", guarded(self.item)),
                  Route("/item/{id}/verdict", guarded(self.verdict), methods=["POST"]),
                  Route("/item/{id}/skip", guarded(self.skip), methods=["POST"]),
                  Route("/undo", guarded(self.undo), methods=["POST"]),
                  Route("/stats", guarded(self.stats_page)), Route("/stats", guarded(self.open_stats), methods=["POST"]),
                  Route("/stats/ratchet.png", guarded(self.plot)),
                  Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")]
        middleware = [Middleware(CheckHost, policy=self.policy),
                      Middleware(SecurityHeaders)]
        return Starlette(routes=routes, middleware=middleware)


def form_problem(verdict: str, claims: list[str], reason: str, n_claims: int,
                 claim_reasons: dict[str, str] | None = None, critique: bool = False) -> str | None:
    """What is wrong with a submitted verdict, in the auditor's words (the audit schema still
    checks what passes here, as it checks `ratchet audit import`). A critique's verdict is right
    or wrong, its ticked claims those whose verdict the critic got wrong."""
    good, bad = ("right", "wrong") if critique else ("pass", "fail")
    if verdict not in (good, bad):
        return f"Choose {good.title()} or {bad.title()}."
    if problem := reason_problem(reason, "A reason"):
        return problem
    if not all(c.isascii() and c.isdigit() and 1 <= int(c) <= n_claims for c in claims):
        return f"{'Claims' if critique else 'Wrong claims'} are numbered 1 to {n_claims}."
    for n, text in (claim_reasons or {}).items():
        if problem := reason_problem(text, f"The reason for claim {n}"):
            return problem
    if verdict == good and claims:
        if critique:
            return "Right names no claim the critic got wrong: untick the claims or choose Wrong."
        return "A pass names no wrong claim: untick the claims or choose Fail."
    return None


def what(x: Item) -> str:
    return "critique" if isinstance(x, SampledCritique) else "reflection"


def reason_problem(reason: str, what: str) -> str | None:
    low, high = REASON_LENGTH
    if reason and not low <= len(reason) <= high:
        cut = f" (shown here cut to the first {high})" if len(reason) > high else ""
        return f"{what} is {low} to {high} characters; yours has {len(reason)}{cut}."
    return None


class SecurityHeaders:
    """Headers on every response: what the page may load, that nobody frames it, and that the
    start token in a URL never leaves for another site in a Referer (same-origin, not
    no-referrer: under no-referrer Chromium sends `Origin: null` on the page's own form posts)."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"), (b"cache-control", b"no-store")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + self.HEADERS
            await send(message)

        await self.app(scope, receive, with_headers)


def serve(ws: Workspace, config: ServeConfig, on_ready=print) -> None:
    import socket

    import uvicorn

    server = AuditServer(ws, config)
    try:  # a clear error before the links are printed, not uvicorn's log line after
        with socket.create_server((config.host, config.port)):
            pass
    except OSError as exc:
        raise WorkspaceError(f"cannot listen on {config.host}:{config.port} ({exc.strerror}): pass --port") from None
    on_ready(server)
    uvicorn.run(server.app(), host=config.host, port=config.port, log_level="warning")

