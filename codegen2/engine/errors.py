"""The one error a request can fail with before it runs, shared by the engine, the server and the CLI."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request that cannot run as given. ``param`` names the parameter that is wrong (None when it is the
    request as a whole), ``status`` is the HTTP status it maps to (400 for a bad value, 413 for a prompt the
    context cannot hold) and ``code`` a machine-readable reason where there is one."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code
