"""Password guessing against the web demo's login is slowed down (issue 29, item 15).

Gradio's `POST /login` answers every try at once, as many as a client sends. This ASGI middleware counts the tries
of each client address: after `max_failures` tries that did not log in within `window` seconds, that address gets
429 (with Retry-After and a one-line reason) for `lockout` seconds, whatever the password. A try counts when it
starts, so parallel guesses count too; a successful login clears its address. At most `max_clients` addresses are
remembered (the least recently seen is forgotten first), so a flood of addresses cannot grow the memory.
"""
import json
import time
from collections import OrderedDict, deque

LOGIN_PATHS = frozenset({"/login", "/login/"})


class LoginLimit:
    def __init__(self, app, *, max_failures: int = 5, window: float = 60.0, lockout: float = 60.0,
                 max_clients: int = 4096, clock=time.monotonic):
        if max_failures < 1 or window <= 0 or lockout <= 0 or max_clients < 1:
            raise ValueError("max_failures and max_clients must be >= 1, window and lockout > 0")
        self.app, self.clock = app, clock
        self.max_failures, self.window, self.lockout, self.max_clients = max_failures, window, lockout, max_clients
        self._clients: OrderedDict[str, tuple[deque, list]] = OrderedDict()  # address → (try times, [locked until])

    def rule(self) -> str:
        return (f"同一地址 {self.window:g} 秒内登录失败 {self.max_failures} 次后，{self.lockout:g} 秒内不再接受其登录。/ "
                f"After {self.max_failures} failed logins within {self.window:g} s, logins from that address are "
                f"refused for {self.lockout:g} s.")

    def _client(self, address: str) -> tuple[deque, list]:
        entry = self._clients.pop(address, None) or (deque(maxlen=self.max_failures), [0.0])
        self._clients[address] = entry  # now the most recently seen
        while len(self._clients) > self.max_clients:
            self._clients.popitem(last=False)
        return entry

    def _start_try(self, address: str) -> float:
        """0 when this try may go on (and is counted as failed until it succeeds), else the seconds to wait."""
        now = self.clock()
        tries, locked_until = self._client(address)
        if locked_until[0] > now:
            return locked_until[0] - now
        while tries and tries[0] <= now - self.window:
            tries.popleft()
        tries.append(now)
        if len(tries) >= self.max_failures:
            locked_until[0] = now + self.lockout  # this is the last try allowed (unless it logs in)
            tries.clear()
        return 0.0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in LOGIN_PATHS:
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("unknown", 0))[0]
        wait = self._start_try(address)
        if wait:
            seconds = max(1, round(wait))
            body = json.dumps({"detail": f"too many failed logins from {address}: try again in {seconds} s"}).encode()
            await send({"type": "http.response.start", "status": 429, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(seconds).encode())]})
            await send({"type": "http.response.body", "body": body})
            return

        async def watch(message):
            if message["type"] == "http.response.start" and message["status"] == 200:
                self._clients.pop(address, None)  # logged in: its earlier failures are forgiven
            await send(message)

        await self.app(scope, receive, watch)
