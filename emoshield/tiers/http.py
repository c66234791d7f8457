"""The services' HTTP server: uvicorn's h11 protocol with a deadline on receiving each request,
and the 503 a service answers while its database is unavailable.

uvicorn bounds the idle time between requests (keep-alive) but not the time a client takes to
send one: a client that sends a header line, then a byte every few seconds (slowloris), or a
2 MB body one byte at a time, holds its connection and file descriptor forever, and a few
thousand such clients stop the edge accepting devices. Here a request's head and body must
arrive within `REQUEST_DEADLINE_SECONDS` of its first byte (and a new connection must start its
first request within that time), or the connection is closed. Responses are not bounded (the
dashboard's event stream is long by design).
"""

from __future__ import annotations

import os
import sys

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

DEADLINE_ENV = "EMOSHIELD_REQUEST_DEADLINE"
REQUEST_DEADLINE_SECONDS = 60.0  # a 2 MB upload at 35 kB/s still makes it


def request_deadline() -> float:
    """Seconds a client has to send a whole request ($EMOSHIELD_REQUEST_DEADLINE, default 60)."""
    value = os.environ.get(DEADLINE_ENV)
    try:
        seconds = float(value) if value else REQUEST_DEADLINE_SECONDS
    except ValueError:
        seconds = REQUEST_DEADLINE_SECONDS
    return seconds if 0 < seconds < 86400 else REQUEST_DEADLINE_SECONDS


class DeadlineH11Protocol(H11Protocol):
    """H11Protocol whose connections are closed when a request has not fully arrived in time."""

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = None
        self._seconds = request_deadline()
        self._arm()  # a connection that never sends anything is closed too

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self._seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # a request is (still) arriving
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        """After every parse (new bytes, or a pipelined request taken from the buffer once the
        previous response is complete, which cancels uvicorn's keep-alive timer): a request still
        arriving keeps (or gets) a deadline counted from its first byte, one that has arrived has none."""
        super().handle_events()
        arriving = self.conn.their_state is h11.SEND_BODY or (
            self.conn.their_state is h11.IDLE and bool(self.conn.trailing_data[0]))  # part of a next request
        if arriving and not self.transport.is_closing():
            self._arm()
        else:  # arrived, or idle between requests (uvicorn's keep-alive timeout; the next byte arms it)
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def answer_503_while_the_database_is_down(app, service: str) -> None:
    """A metadata database that is down, locked or out of pooled connections: every route answers
    503 'retry later' (never a 500), and the driver's message, which may name hosts and SQL, goes
    to the service's log only."""
    from fastapi.responses import JSONResponse

    from .store import UNAVAILABLE, driver_message

    async def database_unavailable(request, exc: Exception):
        sys.stderr.write(f"{service}: database unavailable ({driver_message(exc)})\n")  # one write: lines stay whole
        sys.stderr.flush()
        return JSONResponse({"detail": f"the {service}'s database is unavailable; retry later"}, status_code=503)

    for kind in UNAVAILABLE:
        app.add_exception_handler(kind, database_unavailable)
