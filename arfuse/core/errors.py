"""arfuse's exception types. Bad arguments raise the built-in ValueError/TypeError instead."""
from __future__ import annotations


class ArfuseError(RuntimeError):
    """Base class of every error arfuse raises on its own behalf."""


class FallbackError(ArfuseError):
    """Strict mode: the requested path could not run and arfuse would otherwise have fallen back.

    ``reason`` says why; ``backend`` names the path that was refused.
    """

    def __init__(self, backend: str, reason: str):
        super().__init__(f"arfuse strict mode: backend {backend!r} cannot run: {reason}")
        self.backend = backend
        self.reason = reason


class BackendError(ArfuseError):
    """A backend failed while preparing or running a call."""


class PeerTimeoutError(BackendError):
    """A kernel waited longer than the configured bound for a peer rank (the peer skipped or died)."""
