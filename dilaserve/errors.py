"""Errors users can act on. Each carries a message that names what is wrong and where."""


class DiLaServeError(Exception):
    """Base class for errors that are the caller's to fix (bad input, bad files)."""


class CheckpointError(DiLaServeError):
    """A model directory cannot be loaded: missing file, unknown type, bad weight."""


class InvalidRequestError(DiLaServeError):
    """A request or generation setting is invalid (maps to HTTP 400)."""


class QueueFullError(InvalidRequestError):
    """The replica's waiting queue is full: retry later or elsewhere (maps to HTTP 429)."""


class DeployError(DiLaServeError):
    """A Serve application could not start: a replica failed to construct (a bad engine
    setting, a missing file, too little memory); the message carries its root cause."""
