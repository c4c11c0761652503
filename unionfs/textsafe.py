"""The one escaping every string from an image or a layer goes through before it reaches a terminal.

Tags, build steps, file names and link targets are written by whoever built
the image; printed raw, an OSC sequence retitles the terminal, CSI clears it
and a carriage return forges a line over an honest one, in the very commands
used to vet an image. ``--json`` output needs none of this: JSON escapes
control characters itself.
"""

from __future__ import annotations


def shown(text: object, max_length: int | None = None) -> str:
    """``text`` with every control or unprintable character as a Python escape, optionally elided.

    Undecodable bytes of file names (surrogate escapes) show as ``\\xNN``.
    Idempotent: an already escaped string comes out unchanged.
    """
    text = str(text)
    if not text.isprintable():         # the common case costs one pass in C
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    if max_length is not None and len(text) > max_length:
        text = text[: max_length // 2] + "..." + text[-(max_length // 3):]
    return text
