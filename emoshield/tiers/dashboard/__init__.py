"""The edge operator's dashboard: server-rendered HTML plus one small script, everything served
by the edge itself (no build step, no CDN: it works offline).

    GET  /login                     public  the login form (the admin token, sent in a POST body, never in a URL)
    POST /login                     public  token -> session cookie (HttpOnly, SameSite=Strict, expiring)
    POST /logout                    session + CSRF
    GET  /                          session devices, live emotion timeline, jobs, bundles (else 303 -> /login)
    GET  /dashboard/state           session the page's sections as HTML fragments (JSON)
    GET  /dashboard/events          session server-sent events: heartbeats (timeline) and section updates
    GET  /dashboard/jobs/{id}/log   session a job's whole log
    POST /dashboard/devices         session + CSRF  enrol a device -> 303 /dashboard/enrolled
    GET  /dashboard/enrolled        session the new device's token, shown once
    POST /dashboard/devices/{id}/revoke   session + CSRF
    POST /dashboard/jobs            session + CSRF  queue a training job
    GET  /dashboard/static/dashboard.js   session
    GET  /dashboard/static/dashboard.css  public (the login page's style; it holds no data)

Without a session every route but the login page and the stylesheet answers 401 (pages: a
redirect to /login). Every form carries the session's CSRF token, and a POST whose Origin is
another site is refused too. Pages are sent with a Content-Security-Policy that allows only the
edge's own script and stylesheet (no inline code), so a device name or a heartbeat field that
holds markup is shown as text (autoescaped templates) and can never run."""

# no `from __future__ import annotations` here: FastAPI reads the routes' parameter annotations
# (Request, Path) at registration, and they are imported inside add_dashboard

import asyncio
import json
import time
import urllib.parse
from pathlib import Path

from ..wire import finite
from .state import (LiveFeed, LoginLimiter, Sessions, Session, StreamSlots, _digest, _total, bundle_summary,
                    emotion_counts, job_progress, read_tail)

__all__ = ["LiveFeed", "Sessions", "add_dashboard"]

HERE = Path(__file__).resolve().parent
COOKIE = "emoshield_session"
MAX_FORM_BYTES = 4096
STATE_EVERY = 1.0  # how often a stream looks for changed sections
REFRESH_EVERY = 15.0  # sections are re-sent at least this often ("12 s ago" texts), else only on change
SNAPSHOT_SECONDS = 0.5  # one store read serves every open stream for this long
KEEPALIVE_EVERY = 15.0
POLL_EVERY = 0.25
JOBS_SHOWN = 10
BUNDLES_SHOWN = 10
# Referrer-Policy same-origin, not no-referrer: under no-referrer Chrome sends `Origin: null` with
# the page's own form posts, which the same-origin check would refuse
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY",
    "Cache-Control": "no-store"}
STATIC = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
PUBLIC_STATIC = {"dashboard.css"}


def _environment():
    from jinja2 import Environment, FileSystemLoader, select_autoescape

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}%"
    env.filters["when"] = lambda t: "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    env.filters["ago"] = _ago
    return env


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


SECTIONS = ("devices", "jobs", "bundles")
CLOCK_FIELDS = {"age", "duration"}  # change every second: not a reason to re-send a section


def signature(rows: list[dict]) -> str:
    """What a section shows, less its clock-driven fields: re-sent when this changes."""
    return json.dumps([{k: v for k, v in row.items() if k not in CLOCK_FIELDS} for row in rows], sort_keys=True,
                      default=str)


class DashboardData:
    """The sections' content, read from the node's store and files: one read at most every
    SNAPSHOT_SECONDS for all open pages, and bundle summaries cached (a published bundle never
    changes)."""

    def __init__(self, node, online_within: float):
        import threading

        self.node, self.online_within = node, online_within
        self._bundles: dict[int, dict] = {}
        self._snapshot: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def snapshot(self, max_age: float = SNAPSHOT_SECONDS) -> dict:
        """The sections' data, read again when the last read is older than `max_age` seconds
        (0 for a page load: what an action just changed must show)."""
        with self._lock:
            if self._snapshot is not None and time.monotonic() - self._snapshot[0] < max_age:
                return self._snapshot[1]
            snap = {"devices": self.devices(), "jobs": self.jobs(), "bundles": self.bundles()}
            self._snapshot = (time.monotonic(), snap)
            return snap

    def devices(self) -> list[dict]:
        now, rows = time.time(), []
        for d in self.node.store.devices():
            t = d.get("telemetry") if isinstance(d.get("telemetry"), dict) else {}
            check = t.get("self_check") if isinstance(t.get("self_check"), dict) else {}
            age = None if d.get("last_seen") is None else max(0.0, now - d["last_seen"])
            precision = t.get("precision") if t.get("precision") in ("int8", "fp32") else None
            rows.append({"id": d["id"], "name": d["name"], "age": age,
                         "status": "never seen" if age is None else "online" if age < self.online_within else "offline",
                         "version": d.get("running_version"), "fps": finite(t.get("fps")),
                         "faces": _total(t.get("faces")), "frames": _total(t.get("frames")), "precision": precision,
                         "agreement": finite(check.get("agreement"), 0.0, 1.0),
                         "requested": check.get("requested") if check.get("requested") in ("int8", "fp32") else None,
                         "emotions": emotion_counts(t.get("emotions")), "finished": t.get("finished") is True})
        return rows

    def jobs(self) -> list[dict]:
        rows = []
        for i, job in enumerate(self.node.store.jobs()[::-1][:JOBS_SHOWN]):
            # logs read for the newest job (its tail is shown) and running ones (their step) only
            wanted = job["status"] == "running" or (i == 0 and job["status"] != "queued")
            log = read_tail(self.node.job_dir(job["id"]) / "log.txt") if wanted else ""
            metrics = job.get("metrics") or {}
            ended = job.get("finished") or (time.time() if job["status"] == "running" else None)
            rows.append({**job, "progress": job_progress(job, log),
                         "duration": ended - job["started"] if ended and job.get("started") else None,
                         "test_accuracy": finite(metrics.get("test_accuracy"), 0, 1),
                         "protocol": metrics.get("protocol")})
        return rows

    def bundles(self) -> list[dict]:
        from ..bundle import read_manifest

        rows = []
        for b in self.node.store.bundles(BUNDLES_SHOWN):
            version = b["version"]
            if version not in self._bundles:
                try:
                    summary = bundle_summary(version, b.get("created"),
                                             read_manifest(self.node.store.bundle_dir(version)))
                except Exception:  # noqa: BLE001 - a bundle folder gone or damaged is shown, never an error page
                    summary = bundle_summary(version, b.get("created"), {})
                self._bundles[version] = summary
            rows.append(self._bundles[version])
        return rows


def add_dashboard(app, node, is_admin, session_seconds: float | None = None, online_within: float = 60.0) -> None:
    """Register the dashboard's routes on the edge's FastAPI `app`; `is_admin(token)` checks the
    admin token at login."""
    from fastapi import Request
    from fastapi import Path as PathParam
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import StreamingResponse

    env = _environment()
    sessions = Sessions(session_seconds) if session_seconds else Sessions()
    limiter = LoginLimiter()
    data = DashboardData(node, online_within)
    cfg = node.config
    slots = StreamSlots()
    assets = {name: (HERE / "static" / name).read_bytes() for name in STATIC}

    def secured(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    def page(template: str, status: int = 200, **context) -> HTMLResponse:
        context.setdefault("edge", cfg.name)
        return secured(HTMLResponse(env.get_template(template).render(**context), status_code=status))

    def refused(status: int, why: str) -> Response:
        return secured(PlainTextResponse(f"{status}: {why}", status_code=status))

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def same_origin(request: Request) -> bool:
        """A browser's POST from another site carries its Origin (or Sec-Fetch-Site): refused even
        before the CSRF token is looked at."""
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return False
        return request.headers.get("sec-fetch-site", "same-origin") in ("same-origin", "none")

    async def form_of(request: Request) -> dict[str, str] | None:
        """An urlencoded form of at most MAX_FORM_BYTES, one value per field; None when it is not one."""
        if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return None
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                return None
        try:
            fields = urllib.parse.parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=8,
                                           errors="strict")
        except (UnicodeDecodeError, ValueError):
            return None
        return {k: v[0] for k, v in fields.items() if len(v) == 1}

    async def checked_form(request: Request) -> tuple[Session | None, dict | None, Response | None]:
        """(session, form, None) for an authenticated POST with a valid CSRF token, else the refusal."""
        session = session_of(request)
        if session is None:
            return None, None, refused(401, "log in at /login first")
        if not same_origin(request):
            return None, None, refused(403, "cross-site request refused")
        form = await form_of(request)
        if form is None:
            return None, None, refused(422, f"send an urlencoded form of at most {MAX_FORM_BYTES} bytes")
        if not sessions.check_csrf(session, form.get("csrf")):
            return None, None, refused(403, "missing or wrong CSRF token (reload the page)")
        return session, form, None

    def render(session: Session, snap: dict, names=SECTIONS) -> dict[str, str]:
        context = {"csrf": session.csrf, "classes": cfg.classes, **snap}
        return {name: env.get_template(f"{name}.html").render(**context) for name in names}

    def sections(session: Session) -> dict[str, str]:
        return render(session, data.snapshot(max_age=0))

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request):
        if session_of(request) is not None:
            return secured(RedirectResponse("/", status_code=303))
        return page("login.html")

    @app.post("/login", include_in_schema=False)
    async def login(request: Request):
        client = request.client.host if request.client else "?"
        if limiter.blocked(client):
            return page("login.html", 429, error="too many failed logins; wait a minute")
        if not same_origin(request):
            return refused(403, "cross-site request refused")
        form = await form_of(request)
        token = (form or {}).get("token", "")
        try:
            ok = bool(token) and len(token) <= 512 and is_admin(token)
        except Exception:  # noqa: BLE001 - a token the parser refuses is a failed login, never a 500
            ok = False
        if not ok:
            limiter.failed(client)
            return page("login.html", 401, error="wrong admin token")
        cookie, _ = sessions.create()
        response = secured(RedirectResponse("/", status_code=303))
        response.set_cookie(COOKIE, cookie, max_age=int(sessions.seconds), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout(request: Request):
        session, _, refusal = await checked_form(request)
        if refusal is not None:
            return refusal
        sessions.end(request.cookies.get(COOKIE))
        response = secured(RedirectResponse("/login", status_code=303))
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @app.get("/", include_in_schema=False)
    async def dashboard(request: Request):
        session = session_of(request)
        if session is None:
            return secured(RedirectResponse("/login", status_code=303))
        parts = await run_in_threadpool(sections, session)
        latest = await run_in_threadpool(node.store.latest_version)  # a database call: never on the event loop
        return page("page.html", csrf=session.csrf, sections=parts, classes=cfg.classes, latest=latest)

    @app.get("/dashboard/state", include_in_schema=False)
    async def state(request: Request):
        session = session_of(request)
        if session is None:
            return refused(401, "log in at /login first")
        return secured(JSONResponse(await run_in_threadpool(sections, session)))

    @app.get("/dashboard/events", include_in_schema=False)
    async def events(request: Request):
        """Heartbeats as they arrive (`heartbeat`, numbered: a reconnecting page sends Last-Event-ID
        and gets what it missed) and the sections whenever they change (`state`); the stream ends
        when the session does (`logout`) or the node stops."""
        cookie = request.cookies.get(COOKIE)
        session = sessions.get(cookie)
        if session is None:
            return refused(401, "log in at /login first")
        ticket = slots.reserve(_digest(cookie))
        if ticket is None:
            return refused(429, f"too many event streams open (at most {slots.per_session} per session, "
                                f"{slots.limit} in all)")
        last = request.headers.get("last-event-id", "")
        last = int(last) if last.isascii() and last.isdigit() and len(last) < 19 else 0
        if last > node.feed.last_id:  # an id from before an edge restart: start from what is kept
            last = 0

        from ..store import UNAVAILABLE

        async def stream():
            nonlocal last
            shown: dict[str, str] = {}
            next_state, next_refresh = 0.0, 0.0
            next_keepalive = time.monotonic() + KEEPALIVE_EVERY
            if not slots.claim(ticket):
                return  # reclaimed: this stream started too late
            try:
                yield "retry: 2000\n\n"
                while not node.stopping:
                    if sessions.get(cookie) is None:
                        yield "event: logout\ndata: {}\n\n"
                        return
                    for event_id, event in node.feed.since(last):
                        last = event_id
                        yield f"id: {event_id}\nevent: heartbeat\ndata: {json.dumps(event)}\n\n"
                    now = time.monotonic()
                    snap = None
                    if now >= next_state:
                        next_state = now + STATE_EVERY
                        try:
                            snap = await run_in_threadpool(data.snapshot)
                        except UNAVAILABLE:  # the database is down: the page keeps what it shows
                            pass
                    if snap is not None:
                        refresh = now >= next_refresh
                        changed = [n for n in SECTIONS if refresh or signature(snap[n]) != shown.get(n)]
                        if changed:
                            if refresh:
                                next_refresh = now + REFRESH_EVERY
                            shown.update({n: signature(snap[n]) for n in changed})
                            parts = render(session, snap, changed)
                            yield f"event: state\ndata: {json.dumps(parts)}\n\n"
                    if now >= next_keepalive:
                        next_keepalive = now + KEEPALIVE_EVERY
                        yield ": keepalive\n\n"
                    await asyncio.sleep(POLL_EVERY)
            finally:
                slots.release(ticket)

        return secured(StreamingResponse(stream(), media_type="text/event-stream"))

    @app.get("/dashboard/jobs/{job_id}/log", include_in_schema=False)
    def job_log(request: Request, job_id: int = PathParam(ge=1, le=2**31 - 1)):
        if session_of(request) is None:
            return refused(401, "log in at /login first")
        path = node.job_dir(job_id) / "log.txt"
        if node.store.job(job_id) is None or not path.is_file():
            return refused(404, f"no log for job {job_id}")
        return secured(PlainTextResponse(path.read_text(errors="replace")))

    @app.post("/dashboard/devices", include_in_schema=False)
    async def enrol(request: Request):
        session, form, refusal = await checked_form(request)
        if refusal is not None:
            return refusal
        from ..edge import valid_device_name

        name = form.get("name", "").strip()
        if not valid_device_name(name):
            return refused(422, "a device name is 1-64 printable characters")
        if not session.has_room():
            return refused(429, "tokens of devices enrolled in this session are waiting: open /dashboard/enrolled")
        device_id, token = await run_in_threadpool(node.enrol, name)
        session.add_pending({"name": name, "device_id": device_id, "token": token})
        return secured(RedirectResponse("/dashboard/enrolled", status_code=303))

    @app.get("/dashboard/enrolled", include_in_schema=False)
    def enrolled(request: Request):
        """The devices enrolled in this session since this page was last shown, with their tokens:
        each shown once, then gone."""
        session = session_of(request)
        if session is None:
            return refused(401, "log in at /login first")
        devices = session.take_pending()
        if not devices:
            return secured(RedirectResponse("/#devices", status_code=303))
        return page("enrolled.html", csrf=session.csrf, devices=devices)

    @app.post("/dashboard/devices/{device_id}/revoke", include_in_schema=False)
    async def revoke(request: Request, device_id: str = PathParam(max_length=32, pattern=r"^d[0-9a-f]{12}$")):
        _, _, refusal = await checked_form(request)
        if refusal is not None:
            return refusal
        if not await run_in_threadpool(node.revoke, device_id):
            return refused(404, f"no device {device_id}")
        return secured(RedirectResponse("/#devices", status_code=303))

    @app.post("/dashboard/jobs", include_in_schema=False)
    async def queue(request: Request):
        _, _, refusal = await checked_form(request)
        if refusal is not None:
            return refusal
        await run_in_threadpool(node.queue_job, "dashboard")
        return secured(RedirectResponse("/#jobs", status_code=303))

    @app.get("/dashboard/static/{name}", include_in_schema=False)
    def static(request: Request, name: str = PathParam(max_length=32)):
        if name not in STATIC:
            return refused(404, "no such file")
        if name not in PUBLIC_STATIC and session_of(request) is None:
            return refused(401, "log in at /login first")
        response = Response(assets[name], media_type=STATIC[name])
        secured(response).headers["Cache-Control"] = "private, max-age=300"
        return response
