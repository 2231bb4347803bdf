"""The one exception type the command line turns into `error: ...` + `hint: ...` and exit code 2, and how text from
the user's data (paths, metadata) is made safe to print."""

from __future__ import annotations


class IclcaError(Exception):
    """Bad usage or bad input: a one-line message and a hint on what to do instead."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.message = message
        self.hint = hint


class IclcaWarning(UserWarning):
    """Something the user should know that does not stop the command (the command line prints `warning: ...`)."""


def printable(text: object, limit: int | None = None) -> str:
    """`text` as one line that prints as itself: control and format characters (str.isprintable's others:
    newlines, terminal escapes, bidirectional overrides) are written as escapes (\\n, \\x1b, \\u202e), so data cannot split a message, fake a
    line or drive the terminal. Past `limit` characters the rest is cut and counted."""
    s = str(text)
    cut = ""
    if limit is not None and len(s) > limit:
        s, cut = s[:limit], f"… ({len(s) - limit} more characters)"
    if s.isprintable():
        return s + cut
    return "".join(c if c.isprintable() or c == " " else _escape(c) for c in s) + cut


def _escape(c: str) -> str:
    if c in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"

