"""Error types shared by every ferry stage. The CLI turns a FerryError into one line on stderr and
its `exit_code` (2 unless a subclass says otherwise)."""


class FerryError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""

    exit_code = 2
