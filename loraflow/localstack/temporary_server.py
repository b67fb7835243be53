"""Prefect's temporary server, started before the flow needs it. Imports only Prefect's settings, so that the
server's process starts as early as possible."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE


def start_temporary_server_early() -> Callable[[], None]:
    """With no Prefect server configured, the first flow run of this process starts Prefect's temporary server and
    waits seconds for it. Started now on a thread, it boots on another core while the caller imports the flow and
    validates the config (a fully cached run is mostly that wait). Call the returned function before the flow runs:
    it waits until the server answers; Prefect then reuses it (one server per process). A failure to start is
    raised again, in full, by the flow's own start."""
    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return lambda: None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().start()

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()
    return thread.join
