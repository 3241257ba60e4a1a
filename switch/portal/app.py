"""The merchant portal's ASGI app (Starlette + Jinja2, zh-CN, server-rendered) and ``serve_portal``,
which runs it with uvicorn inside the caller's task group.

Owns: the routes and what each answers (pages, ``/api/today``, ``/history.csv``), login / logout,
the CSRF check on every POST (403 without a valid token), the rule that a merchant's session
scopes every read (another merchant's terminal, journal row or settlement day answers 404, the
same as one that does not exist), response headers (CSP with a per-response script nonce,
no-store, no framing), and the HTTP server's life cycle.

Must not: read or write the store except through ``data`` (reads), ``accounts`` / ``auth``
(accounts and sessions, through the group-commit writer), ``switch.admin.onboarding`` (webhook
binding, in a worker thread: it takes the store's commit lock) and ``WebhookOutbox.op_enqueue``
(the test event); install signal handlers (the switch owns SIGTERM / SIGINT); log a password,
session id, token, webhook secret or full card number.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import h11
import jinja2
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from switch.adapters.sqlite_store import SqliteStore
from switch.adapters.webhooks import WebhookOutbox
from switch.admin import onboarding
from switch.admin.reports import display_date, parse_business_date
from switch.domain.money import yuan
from switch.portal import accounts, auth, data, texts
from switch.portal.auth import Session

__all__ = ["create_app", "serve_portal"]

log = logging.getLogger("switch.portal")

HERE = Path(__file__).resolve().parent
POLL_MS = 2000
MAX_URL_LENGTH = 500
CSP = (
    "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_MID_CHARS = frozenset("0123456789")

Handler = Callable[[Request], Awaitable[Response]]


class _SecurityHeaders:
    """Adds the headers every answer carries (pages may set their own CSP with a nonce)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                    (b"content-security-policy", CSP.format(nonce=secrets.token_urlsafe(8)).encode()),
                    (b"cache-control", b"public, max-age=3600" if static else b"no-store"),
                ]
                headers += [(k, v) for k, v in extra if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class Portal:
    """The handlers over one store. ``clock``: epoch seconds (tests move it for the lockout)."""

    def __init__(self, store: SqliteStore, *, secure_cookies: bool, clock: Callable[[], float]) -> None:
        self.store = store
        self.secure = secure_cookies
        self.clock = clock
        self.unknown_mids = accounts.UnknownMids()  # locked like accounts: no telling them apart
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters["yuan"] = yuan
        self.templates = Jinja2Templates(env=env)
        self.outbox = WebhookOutbox(store, clock=clock)

    # ---- helpers --------------------------------------------------------------------------
    def today(self) -> date:
        return data.business_today(self.clock())

    def session(self, request: Request) -> Session | None:
        return auth.load_session(self.store, request, self.clock())

    def render(self, request: Request, name: str, context: dict[str, Any], *,
               session: Session | None, status: int = 200) -> Response:
        nonce = secrets.token_urlsafe(16)
        shop = ""
        if session is not None:
            rows = self.store.query("SELECT shop_name FROM merchants WHERE mid = ?", (session.mid,))
            shop = str(rows[0]["shop_name"]) if rows else ""
        ctx = {"session": session, "csrf": session.csrf if session else "", "nonce": nonce,
               "shop_name": shop, "mid": session.mid if session else "", "nav": "", "error": "",
               **context}
        response = self.templates.TemplateResponse(request, name, ctx, status_code=status)
        response.headers["content-security-policy"] = CSP.format(nonce=nonce)
        return response

    def not_found(self, request: Request, session: Session | None) -> Response:
        return self.render(request, "error.html", {"title": "页面不存在",
                                                   "message": "没有找到这个页面，或它不属于您的商户。"},
                           session=session, status=404)

    def forbidden(self, request: Request, session: Session | None) -> Response:
        return self.render(request, "error.html", {"title": "请求无效",
                                                   "message": "表单已过期或来源无效，请刷新页面后重试。"},
                           session=session, status=403)

    async def form(self, request: Request) -> dict[str, str]:
        async with request.form(max_files=0, max_fields=20, max_part_size=64 * 1024) as form:
            return {k: v for k, v in form.items() if isinstance(v, str)}

    # ---- login / logout -------------------------------------------------------------------
    def login_page(self, request: Request, *, error: str = "", mid: str = "",
                   status: int = 200) -> Response:
        token = auth.new_token()
        response = self.render(request, "login.html", {"login_csrf": token, "error": error,
                                                       "login_mid": mid, "title": "商户登录"},
                               session=None, status=status)
        auth.set_login_csrf_cookie(response, token, secure=self.secure)
        return response

    async def login(self, request: Request) -> Response:
        if request.method == "GET":
            if self.session(request) is not None:
                return RedirectResponse("/", status_code=303)
            return self.login_page(request)
        form = await self.form(request)
        if not auth.csrf_ok(form.get("csrf"), request.cookies.get(auth.LOGIN_CSRF_COOKIE)):
            return self.forbidden(request, None)
        mid = form.get("mid", "").strip()
        password = form.get("password", "")
        if len(mid) != 15 or not set(mid) <= _MID_CHARS:
            mid = ""  # no account matches; the attempt still costs one scrypt
        session_id, _, op = auth.op_create_session(
            mid, self.clock(), replaces=request.cookies.get(auth.SESSION_COOKIE)
        )
        result = await accounts.check_login(self.store, mid, password, on_success=op, clock=self.clock,
                                            unknown=self.unknown_mids)
        if result.ok:
            response: Response = RedirectResponse("/", status_code=303)
            auth.set_session_cookie(response, session_id, secure=self.secure)
            response.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/login")
            return response
        if result.locked_until is not None:
            minutes = max(1, -(-int(result.locked_until - self.clock()) // 60))
            return self.login_page(
                request, mid=mid, status=429,
                error=f"连续 {accounts.MAX_FAILURES} 次密码错误，账户已锁定，请 {minutes} 分钟后再试。",
            )
        return self.login_page(request, mid=mid, status=401, error="商户号或密码错误。")

    async def logout(self, request: Request) -> Response:
        session = self.session(request)
        if session is None:
            return RedirectResponse("/login", status_code=303)
        form = await self.form(request)
        if not auth.csrf_ok(form.get("csrf"), session.csrf):
            return self.forbidden(request, session)
        await auth.delete_session(self.store, request)
        response = RedirectResponse("/login", status_code=303)
        auth.clear_session_cookie(response, secure=self.secure)
        return response

    # ---- pages ----------------------------------------------------------------------------
    async def today_page(self, request: Request, session: Session) -> Response:
        day = self.today()
        rows = data.day_rows(self.store, session.mid, day)
        views = [data.txn_view(r) for r in reversed(rows[-data.PAGE_ROWS:])]
        return self.render(request, "today.html", {
            "nav": "today", "title": "今日交易", "day": day.isoformat(), "rows": views,
            "totals": data.totals(rows).to_dict(), "last_id": rows[-1]["id"] if rows else 0,
            "poll_ms": POLL_MS,
        }, session=session)

    async def api_today(self, request: Request, session: Session) -> Response:
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            after = -1
        if after < 0:
            return JSONResponse({"error": "after must be a whole number"}, status_code=400)
        day = self.today()
        all_rows = data.day_rows(self.store, session.mid, day)
        new = [r for r in all_rows if int(r["id"]) > after][: data.PAGE_ROWS]
        last = int(new[-1]["id"]) if new else after
        return JSONResponse({
            "day": day.isoformat(), "rows": [data.txn_view(r) for r in new], "last_id": last,
            "totals": data.totals(all_rows).to_dict(),
        })

    def _history_filter(self, request: Request, session: Session) -> data.HistoryFilter:
        params = {k: v for k, v in request.query_params.items()}
        return data.parse_history_filter(self.store, session.mid, params, self.today())

    async def history_page(self, request: Request, session: Session) -> Response:
        today = self.today()
        try:
            f = self._history_filter(request, session)
        except data.NotFound:
            return self.not_found(request, session)
        except data.FilterError as exc:
            default = data.HistoryFilter(today - timedelta(days=6), today)
            return self.render(request, "history.html", {
                "nav": "history", "title": "历史交易", "error": str(exc), "f": default, "rows": [],
                "more": False, "terminals": data.terminals(self.store, session.mid), "searched": False,
            }, session=session, status=400)
        rows = data.history_rows(self.store, session.mid, f, data.PAGE_ROWS + 1)
        return self.render(request, "history.html", {
            "nav": "history", "title": "历史交易", "f": f,
            "rows": [data.txn_view(r) for r in rows[: data.PAGE_ROWS]],
            "more": len(rows) > data.PAGE_ROWS, "terminals": data.terminals(self.store, session.mid),
            "searched": True,
        }, session=session)

    async def history_csv(self, request: Request, session: Session) -> Response:
        try:
            f = self._history_filter(request, session)
        except data.NotFound:
            return self.not_found(request, session)
        except data.FilterError as exc:
            return Response(str(exc), status_code=400, media_type="text/plain; charset=utf-8")
        rows = data.history_rows(self.store, session.mid, f, data.CSV_MAX_ROWS)
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\r\n")
        w.writerow(("时间", "终端号", "交易类型", "卡号", "金额(元)", "手续费(元)", "结果", "应答码",
                    "原因", "状态", "参考号", "授权码", "凭证号", "批次号"))
        for r in rows:
            v = data.txn_view(r)
            w.writerow(_csv_safe((v["time"], v["tid"], v["txn_zh"], v["card"], v["amount"], v["fee"],
                                  v["result"], v["response_code"], v["reason"], v["state_zh"],
                                  v["rrn"], v["auth_code"], v["stan"], v["batch"])))
        name = f"transactions-{f.start:%Y%m%d}-{f.end:%Y%m%d}.csv"
        return Response(
            ("\ufeff" + buf.getvalue()).encode("utf-8"), media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="{name}"'},
        )

    async def transaction_page(self, request: Request, session: Session) -> Response:
        row_id = int(request.path_params["row_id"])
        try:
            row = data.transaction(self.store, session.mid, row_id)
        except data.NotFound:
            return self.not_found(request, session)
        return self.render(request, "transaction.html", {
            "nav": "history", "title": "交易详情", "t": data.txn_view(row),
        }, session=session)

    async def settlement_page(self, request: Request, session: Session) -> Response:
        today = self.today()
        month_text = request.query_params.get("month", "").strip() or today.strftime("%Y-%m")
        try:
            first = date.fromisoformat(month_text + "-01")
        except ValueError:
            return self.render(request, "error.html", {"title": "参数错误",
                                                       "message": "月份格式应为 YYYY-MM。"},
                               session=session, status=400)
        nxt = (first + timedelta(days=32)).replace(day=1)
        days = data.settlement_days(self.store, session.mid, first, nxt - timedelta(days=1), today)
        usage = data.month_usage(self.store, session.mid, first.strftime("%Y%m"))
        prev = (first - timedelta(days=1)).replace(day=1)
        return self.render(request, "settlement.html", {
            "nav": "settlement", "title": "结算", "month": first.strftime("%Y-%m"),
            "prev_month": prev.strftime("%Y-%m"),
            "next_month": nxt.strftime("%Y-%m") if nxt <= today else "",
            "days": list(reversed(days)), "usage": usage,
            "sum_net": sum(d.net_fen for d in days), "sum_fees": sum(d.fees_fen for d in days),
            "sum_refunds": sum(d.refunds_fen for d in days), "sum_paid": sum(d.paid_fen for d in days),
            "carried": days[-1].carried_fen if days else None,
        }, session=session)

    async def settlement_day_page(self, request: Request, session: Session) -> Response:
        try:
            day = date.fromisoformat(display_date(parse_business_date(request.path_params["day"])))
            line = data.settlement_day(self.store, session.mid, day, self.today())
        except (ValueError, data.NotFound):
            return self.not_found(request, session)
        return self.render(request, "settlement_day.html", {
            "nav": "settlement", "title": f"结算 {line.date_text}", "d": line,
            "history_query": data.HistoryFilter(day, day).query_string(),
        }, session=session)

    async def terminals_page(self, request: Request, session: Session) -> Response:
        return self.render(request, "terminals.html", {
            "nav": "terminals", "title": "终端", "terminals": data.terminals(self.store, session.mid),
        }, session=session)

    async def verify_page(self, request: Request, session: Session) -> Response:
        tid = str(request.path_params["tid"])
        if not data.terminal_owned(self.store, session.mid, tid):
            return self.not_found(request, session)
        try:
            view = onboarding.show_terminal(self.store, tid)
        except onboarding.OnboardingError:
            return self.not_found(request, session)
        if view.mid != session.mid:  # cannot happen after terminal_owned; never show it anyway
            return self.not_found(request, session)
        return self.render(request, "verify.html", {
            "nav": "terminals", "title": f"核验终端 {tid}", "v": view,
            "role_zh": texts.ROLE_ZH.get(view.role, view.role),
            "state_zh": texts.TERMINAL_STATE_ZH.get(view.state, view.state),
        }, session=session)

    def _notifications(self, request: Request, session: Session, *, secret: str = "",
                       error: str = "", notice: str = "", status: int = 200) -> Response:
        return self.render(request, "notifications.html", {
            "nav": "notifications", "title": "交易通知",
            "url": data.webhook_url(self.store, session.mid) or "", "secret": secret,
            "error": error, "notice": notice,
            "deliveries": data.deliveries(self.store, session.mid),
        }, session=session, status=status)

    async def notifications_page(self, request: Request, session: Session) -> Response:
        notice = {"test": "测试通知已加入发送队列。", "unbound": "已解除绑定。"}.get(
            request.query_params.get("done", ""), "")
        return self._notifications(request, session, notice=notice)

    async def _checked_form(self, request: Request, session: Session) -> dict[str, str] | None:
        form = await self.form(request)
        return form if auth.csrf_ok(form.get("csrf"), session.csrf) else None

    async def bind_webhook(self, request: Request, session: Session) -> Response:
        form = await self._checked_form(request, session)
        if form is None:
            return self.forbidden(request, session)
        url = form.get("url", "").strip()
        if not url or len(url) > MAX_URL_LENGTH:
            return self._notifications(request, session, status=400,
                                       error=f"请填写不超过 {MAX_URL_LENGTH} 个字符的通知地址。")
        try:
            secret = await anyio.to_thread.run_sync(onboarding.set_webhook, self.store, session.mid, url)
        except onboarding.OnboardingError:
            return self._notifications(request, session, status=400,
                                       error="通知地址须以 http:// 或 https:// 开头。")
        log.info("portal: merchant %s bound a webhook", session.mid)
        return self._notifications(request, session, secret=secret or "",
                                   notice="绑定成功。签名密钥只显示这一次，请立即保存。")

    async def unbind_webhook(self, request: Request, session: Session) -> Response:
        if await self._checked_form(request, session) is None:
            return self.forbidden(request, session)
        await anyio.to_thread.run_sync(onboarding.set_webhook, self.store, session.mid, None)
        log.info("portal: merchant %s removed its webhook", session.mid)
        return RedirectResponse("/notifications?done=unbound", status_code=303)

    async def test_event(self, request: Request, session: Session) -> Response:
        if await self._checked_form(request, session) is None:
            return self.forbidden(request, session)
        if data.webhook_url(self.store, session.mid) is None:
            return self._notifications(request, session, status=400, error="请先绑定通知地址。")
        event = {"type": "test", "txn": "test", "response_code": "00",
                 "business_date": self.today().strftime("%Y%m%d")}
        await self.store.write(self.outbox.op_enqueue(session.mid, event))
        log.info("portal: merchant %s queued a test event", session.mid)
        return RedirectResponse("/notifications?done=test", status_code=303)

    # ---- plumbing -------------------------------------------------------------------------
    def page(self, handler: Callable[[Request, Session], Awaitable[Response]], *,
             api: bool = False, post: bool = False) -> Handler:
        """Only with a live session: pages redirect to /login, the API answers 401."""

        async def endpoint(request: Request) -> Response:
            session = self.session(request)
            if session is None:
                if api:
                    return JSONResponse({"error": "login required"}, status_code=401)
                if post:
                    return self.forbidden(request, None)
                return RedirectResponse("/login", status_code=303)
            return await handler(request, session)

        return endpoint

    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        session = self.session(request)
        if status == 404:
            return self.not_found(request, session)
        titles = {405: "不支持的请求方法"}
        return self.render(request, "error.html", {"title": titles.get(status, "请求无法处理"),
                                                   "message": f"HTTP {status}"},
                           session=session, status=status)


def _csv_safe(values: tuple[str, ...]) -> list[str]:
    """No cell starts a spreadsheet formula."""
    return ["'" + v if v[:1] in ("=", "+", "@", "\t", "\r") else v for v in values]


def create_app(
    store: SqliteStore, *, secure_cookies: bool = False, clock: Callable[[], float] = time.time
) -> Starlette:
    """The portal over an open store. Creates the portal tables (blocking, once). Logins, logouts
    and test events write through the store's group-commit writer, which must be running."""
    accounts.ensure_schema(store)
    p = Portal(store, secure_cookies=secure_cookies, clock=clock)
    routes = [
        Route("/login", p.login, methods=["GET", "POST"]),
        Route("/logout", p.logout, methods=["POST"]),
        Route("/", p.page(p.today_page)),
        Route("/api/today", p.page(p.api_today, api=True)),
        Route("/history", p.page(p.history_page)),
        Route("/history.csv", p.page(p.history_csv)),
        Route("/transactions/{row_id:int}", p.page(p.transaction_page)),
        Route("/settlement", p.page(p.settlement_page)),
        Route("/settlement/{day}", p.page(p.settlement_day_page)),
        Route("/terminals", p.page(p.terminals_page)),
        Route("/terminals/{tid}/verify", p.page(p.verify_page)),
        Route("/notifications", p.page(p.notifications_page)),
        Route("/notifications/webhook", p.page(p.bind_webhook, post=True), methods=["POST"]),
        Route("/notifications/unbind", p.page(p.unbind_webhook, post=True), methods=["POST"]),
        Route("/notifications/test", p.page(p.test_event, post=True), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: p.http_error})
    app.add_middleware(_SecurityHeaders)
    return app


# Bounds uvicorn does not have (security review I): idle half-requests were held for ever, each
# one a file descriptor of the switch process, until the terminal port could not accept.
REQUEST_TIMEOUT = 10.0  # seconds from connecting (or the last response) to a whole request
MAX_CONNECTIONS = 128  # portal connections at once; at most a quarter of the process's descriptors


def _connection_cap() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, ValueError, OSError):  # pragma: no cover - not on Linux
        return MAX_CONNECTIONS
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else min(MAX_CONNECTIONS, max(8, soft // 4))


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol with the two bounds it lacks: a connection beyond ``max_connections``
    is closed as it is accepted, and one that has not sent a whole request (head and body) within
    ``REQUEST_TIMEOUT`` of connecting or of its previous response is closed (uvicorn times out
    only keep-alive connections that send nothing at all)."""

    max_connections = MAX_CONNECTIONS
    _refused = False
    _request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refused = True
            log.warning("merchant portal: %d connections open, refusing one", len(self.connections))
            transport.close()
            return
        super().connection_made(transport)
        self._watch_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_request_timer()
        if not self._refused:
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        self._watch_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_request()

    def _watch_request(self) -> None:
        """Run the timer while a request is awaited or arriving, not while it is answered."""
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            if self._request_timer is None:
                self._request_timer = self.loop.call_later(REQUEST_TIMEOUT, self._request_timed_out)
        else:
            self._stop_request_timer()

    def _stop_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if not self.transport.is_closing():
            self.transport.close()


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the switch's task group owns SIGTERM / SIGINT."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def serve_portal(
    store: SqliteStore,
    host: str,
    port: int,
    *,
    secure_cookies: bool = False,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the portal on ``host:port`` (0: any free port) until cancelled; reports the bound
    port through ``task_status``. On cancellation the server stops accepting, lets requests in
    progress finish (at most 5 s) and closes its connections. Needs the asyncio backend."""
    app = create_app(store, secure_cookies=secure_cookies)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
        bound = int(sock.getsockname()[1])
        protocol = type("PortalH11", (_BoundedH11,), {"max_connections": _connection_cap()})
        config = uvicorn.Config(
            app, lifespan="off", log_config=None, access_log=False, server_header=False,
            timeout_graceful_shutdown=5, proxy_headers=False, http=protocol,
        )
        server = _Server(config)
        async with anyio.create_task_group() as tg:

            async def run() -> None:
                with anyio.CancelScope(shield=True):
                    await server.serve(sockets=[sock])
                if not server.should_exit:
                    raise RuntimeError("the portal's HTTP server stopped by itself")

            tg.start_soon(run)
            task_status.started(bound)
            log.info("merchant portal on %s:%d", host, bound)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
    finally:
        sock.close()
