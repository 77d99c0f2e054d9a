"""The user-facing error types: a message names the bad value and what is accepted."""


class AfdError(Exception):
    """A problem the user can fix (bad model directory, bad parameter, ...).

    The CLI prints it as one line and exits non-zero; the server maps it to a 4xx response.
    """


class NothingToRecord(AfdError):
    """/debug/trace asked for steps while no request runs (the server answers 409)."""
