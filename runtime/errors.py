"""Error types shared by every ferry stage. The CLI turns a FerryError into a one-line message."""


class FerryError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
