"""Errors the engine raises to its callers."""


class InvalidRequestError(ValueError):
    """A request that cannot be served as asked; `field` names the offending input."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class EngineDeadError(RuntimeError):
    """The engine's loop has stopped and takes no more requests."""


class EngineBusyError(RuntimeError):
    """The waiting queue is full: the request is refused now rather than queued without bound."""
