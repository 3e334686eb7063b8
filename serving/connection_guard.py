"""Half-open connections cannot exhaust the server (issue 29, item 6: slowloris).

uvicorn 0.54 (h11) has no deadline for a request's headers: 260 connections that send a header byte now and then
held 260 file descriptors until accept() failed, and each failure logged a traceback (36 MB in 15 s). The protocol
class made here (`guarded_protocol`, uvicorn's `http=` setting; written against uvicorn 0.54's H11Protocol:
`connection_made`, `data_received`, `connection_lost`, its `cycle` and `connections`) adds:
- a header deadline: a connection that has not sent a whole request head within `header_timeout` seconds of
  connecting, or of starting its next request, is closed;
- a connection cap: beyond `max_connections` open connections, a new one is closed at once;
- one log line per condition for the life of the server, not one per connection.
"""
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("serving")


def guarded_protocol(header_timeout: float, max_connections: int):
    said = set()

    def say_once(condition: str, message: str) -> None:
        if condition not in said:
            said.add(condition)
            log.warning("%s (said once; later ones are not logged)", message)

    class GuardedH11Protocol(H11Protocol):
        _deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                say_once("cap", f"more than {max_connections} open connections: new ones are closed "
                                "(--max_connections)")
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.cycle is None or self.cycle.response_complete:  # still waiting for a request head
                say_once("slow", f"a connection sent no complete request head within {header_timeout:g} s: "
                                 "closed (--header_timeout)")
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            waiting = self.cycle is None or self.cycle.response_complete
            if waiting:
                self._arm()  # the next request's head has begun: it gets header_timeout seconds
            before = self.cycle
            super().data_received(data)
            if self.cycle is not before:  # a request head arrived and its cycle started
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11Protocol
