"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class CartError(Exception):
    """A user-facing error: bad config, bad input file, stale or missing stage output."""
