"""Web pages in the user's browser cannot drive a local server (issue 29, item 8).

A server on 127.0.0.1 is reachable by every page the user opens: through DNS rebinding (a page's own host name
that resolves to 127.0.0.1, so the browser sends `Host: attacker.example`) it can read the answers, and with a
"simple" cross-origin POST (`Content-Type: text/plain`, no CORS preflight) it can spend the model. This ASGI
middleware, in front of the API:
- answers only the loopback host names (127.0.0.1, localhost, ::1) while bound to loopback, plus `--allowed_hosts`
  (bound elsewhere: any host unless `--allowed_hosts` names them);
- refuses a request that a browser marks as cross-origin (an `Origin` other than the server's own) unless
  `--cors_origins` names it, and answers CORS preflights for those it names;
- takes POST bodies only as `application/json` (a browser cannot send that cross-origin without a preflight);
  `json_posts=False` for the web demo, whose login is a form POST (there the Origin check is the guard: browsers
  send `Origin` with every cross-origin POST).
The web demo (serving/web_server.py) runs the same guard in front of its Gradio page. Refusals are OpenAI-shaped
JSON errors; the connection stays up for the next request.
"""
import argparse
import json
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def host_name(value: str) -> str:
    """'[::1]:8000' → '::1', 'LocalHost:80' → 'localhost'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def loopback(host: str) -> bool:
    return host_name(host) in LOOPBACK_HOSTS


class OriginGuard:
    def __init__(self, app, *, bound_host: str, allowed_hosts=(), cors_origins=(), json_posts: bool = True):
        self.app, self.json_posts = app, json_posts
        extra = {host_name(h) for h in allowed_hosts if h}
        self.hosts = (LOOPBACK_HOSTS | extra) if loopback(bound_host) or extra else None  # None: any host
        self.origins = {o.rstrip("/").lower() for o in cors_origins if o}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return await _refuse(send, 400, f"this server does not answer for the host {host!r} (a guard against "
                                            "DNS rebinding); pass --allowed_hosts to name it", "invalid_host")
        origin = headers.get("origin", "").rstrip("/").lower()
        cors = None
        if origin and origin != "null" and urlsplit(origin).netloc != host.lower():
            if origin not in self.origins:
                return await _refuse(send, 403, f"cross-origin requests from {origin} are refused; pass "
                                                f"--cors_origins {origin} to allow that page", "cross_origin")
            cors = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
            if scope["method"] == "OPTIONS":  # the preflight of an allowed origin
                return await _respond(send, 204, b"", cors + [
                    (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
                    (b"access-control-allow-headers", b"authorization, content-type"),
                    (b"access-control-max-age", b"600")])
        elif origin == "null":
            return await _refuse(send, 403, "requests from an opaque origin (a sandboxed page or a file) are "
                                            "refused", "cross_origin")
        json_body = headers.get("content-type", "").lower().startswith("application/json")
        if self.json_posts and scope["method"] == "POST" and not json_body:
            return await _refuse(send, 415, "expected Content-Type: application/json", "unsupported_media_type",
                                 cors or [])
        if cors is None:
            return await self.app(scope, receive, send)

        async def send_with_cors(message):
            if message["type"] == "http.response.start":  # ours replace the app's own (Gradio sets some)
                own = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"access-control-allow-origin"]
                message = {**message, "headers": own + cors}
            await send(message)

        return await self.app(scope, receive, send_with_cors)


async def _refuse(send, status: int, message: str, code: str, extra=()):
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()
    await _respond(send, status, body, [(b"content-type", b"application/json"), *extra])


async def _respond(send, status: int, body: bytes, headers):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def add_origin_flags(parser: argparse.ArgumentParser, clients: str) -> None:
    """--allowed_hosts and --cors_origins, the same for the API and the web demo (`clients`: who connects)."""
    parser.add_argument("--allowed_hosts", nargs="*", default=[], metavar="HOST",
                        help=f"host names {clients} may use besides 127.0.0.1 / localhost / ::1 (a guard against DNS "
                             "rebinding; bound to a non-loopback address: only these, when given)")
    parser.add_argument("--cors_origins", nargs="*", default=[], metavar="ORIGIN",
                        help="other web pages (e.g. http://localhost:3000) allowed to call this server from a "
                             "browser; other cross-origin requests are refused")
