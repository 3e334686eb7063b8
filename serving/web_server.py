"""The web demo's HTTP server: the Gradio page mounted on our own FastAPI app (`gr.mount_gradio_app`, Gradio's
supported way to put an app behind middleware) and run by uvicorn as the API server is, with the API's guards:
- serving/origin_guard.py: loopback host names only while bound to loopback (DNS rebinding), no cross-origin
  browser requests unless named (issue 29, item 8);
- serving/login_limit.py: failed logins from one address are limited (issue 29, item 15);
- no uploads (the page takes none; Gradio's upload route answers with server temp paths: issue 29, item 11), and
  with a login, none of Gradio's routes before it (its heartbeat stream was open);
- serving/connection_guard.py: header deadline and connection cap (issue 29, item 6);
- SIGTERM / Ctrl-C: the API's drain (replies in flight finish for up to --drain_timeout s, the rest end cut where
  they are), then the page's open streams end, exit 0 (issue 33, item 8).
`GET /health` says ok / draining and nothing else (no login needed: a readiness check for scripts).
"""
import asyncio
import threading
import time
from contextlib import asynccontextmanager

import gradio as gr

from .connection_guard import guarded_protocol
from .login_limit import LoginLimit
from .origin_guard import OriginGuard

CLOSED_PATHS = ("/gradio_api/upload", "/gradio_api/upload_progress")
OPEN_STREAMS = ("/gradio_api/heartbeat/",)  # Gradio routes that answer without a login (LoginRequired closes them)
HEADER_TIMEOUT, MAX_CONNECTIONS = 10.0, 512  # the API's defaults (serving/api.py --header_timeout, --max_connections)


class ClosedPaths:
    """404 for the given paths (and what is under them), whoever asks: routes Gradio adds that the page never uses."""

    def __init__(self, app, paths):
        self.app, self.paths = app, tuple(p.rstrip("/") for p in paths)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] == "http" and any(path == p or path.startswith(p + "/") for p in self.paths):
            body = b'{"detail": "not available on this server"}'
            await send({"type": "http.response.start", "status": 404, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class LoginRequired:
    """401 for the given path prefixes without a logged-in session: Gradio 6.31 leaves its per-tab heartbeat stream
    (`/gradio_api/heartbeat/…`) open to anyone, a stream held as long as the visitor wants. The session is Gradio's
    own: its login cookie (`access-token[-unsecure]-<cookie_id>`) naming one of its tokens."""

    def __init__(self, app, prefixes, gradio_app):
        self.app, self.prefixes, self.gradio_app = app, tuple(prefixes), gradio_app

    def _logged_in(self, scope) -> bool:
        from starlette.requests import HTTPConnection

        cookies, gradio_app = HTTPConnection(scope).cookies, self.gradio_app
        for name in (f"access-token-{gradio_app.cookie_id}", f"access-token-unsecure-{gradio_app.cookie_id}"):
            if cookies.get(name) in gradio_app.tokens:
                return True
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith(self.prefixes) and not self._logged_in(scope):
            body = b'{"detail": "Not authenticated"}'
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


class PageStreams:
    """Ends the page's long-lived streams (Gradio's per-tab heartbeats), which would hold a stopping server until
    uvicorn's own deadline; from any thread, once the server runs."""

    def __init__(self):
        self.loop, self.gradio_app = None, None

    def end(self) -> None:
        if self.loop is not None and self.gradio_app is not None:
            self.loop.call_soon_threadsafe(self.gradio_app.stop_event.set)


def web_app(page: gr.Blocks, engine, *, host: str = "127.0.0.1", auth=None, allowed_hosts=(), cors_origins=(),
            theme=None, css: str | None = None, login_limit: dict | None = None):
    """The ASGI app: guards → FastAPI (/health) → the page. `login_limit`: LoginLimit's settings. Returns
    (app, PageStreams)."""
    from fastapi import FastAPI
    from starlette.routing import Mount

    streams = PageStreams()

    @asynccontextmanager
    async def lifespan(app):
        streams.loop = asyncio.get_running_loop()
        yield

    root = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @root.get("/health")
    def health():
        return {"status": "draining" if engine.stats()["closed"] else "ok"}

    gr.mount_gradio_app(root, page, path="/", auth=auth, server_name=host, theme=theme, css=css, show_error=True,
                        ssr_mode=False, pwa=False, mcp_server=False, run_history=False,
                        footer_links=["gradio", "settings"])
    streams.gradio_app = next(r.app for r in root.routes if isinstance(r, Mount))
    app = ClosedPaths(root, CLOSED_PATHS)
    if auth:
        app = LoginLimit(LoginRequired(app, OPEN_STREAMS, streams.gradio_app), **(login_limit or {}))
        page.auth_message = app.rule()  # the login page says it (Gradio reads it at each request)
    return OriginGuard(app, bound_host=host, allowed_hosts=allowed_hosts, cors_origins=cors_origins,
                       json_posts=False), streams


def uvicorn_config(app, host: str, port: int, drain_timeout: float):
    import uvicorn

    from .api import DRAIN_MARGIN

    return uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                          timeout_graceful_shutdown=max(1, int(drain_timeout + DRAIN_MARGIN)),
                          http=guarded_protocol(HEADER_TIMEOUT, MAX_CONNECTIONS))


class _DrainThenEndStreams:
    """What the API's draining server closes on SIGTERM: the engine (its drain), then the page's streams."""

    def __init__(self, engine, streams: PageStreams):
        self.engine, self.streams = engine, streams

    def close(self, timeout: float) -> bool:
        try:
            return self.engine.close(timeout)
        finally:
            self.streams.end()


def serve(app, streams: PageStreams, engine, *, host: str, port: int, drain_timeout: float) -> None:
    """Run in this (the main) thread until SIGTERM / Ctrl-C, then drain as the API does; returns (exit 0)."""
    from .api import draining_server_class

    server_class = draining_server_class(_DrainThenEndStreams(engine, streams), drain_timeout)
    server_class(uvicorn_config(app, host, port, drain_timeout)).run()


class BackgroundServer:
    """The server in a thread (tests, notebooks): `close()` stops it (the engine is the caller's)."""

    def __init__(self, app, streams: PageStreams, *, host: str, port: int, start_seconds: float = 30):
        import uvicorn

        self.streams = streams
        self.server = uvicorn.Server(uvicorn_config(app, host, port, drain_timeout=1))
        self.thread = threading.Thread(target=self.server.run, name="web-demo-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_seconds
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the web demo did not start on {host}:{port}")
            time.sleep(0.02)

    def close(self) -> None:
        self.streams.end()
        self.server.should_exit = True
        self.thread.join(timeout=15)
