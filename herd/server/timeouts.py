"""Connection-level limits for uvicorn's h11 protocol: a connection must deliver a complete request
head within `header_timeout` seconds of opening (or of its previous response), else it is closed.

uvicorn's own `timeout_keep_alive` only runs between requests and is cancelled by the first byte
of the next one, so a client that opens connections and sends nothing, or trickles a header a
byte at a time (slowloris), holds them forever without this.
"""
from __future__ import annotations

from uvicorn.protocols.http.h11_impl import H11Protocol


def header_timeout_protocol(header_timeout: float) -> type[H11Protocol]:
    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer = None

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            # Only while no request is in progress: one whose head arrived is the app's business.
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return HeaderTimeoutH11Protocol
