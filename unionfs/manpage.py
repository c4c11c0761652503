"""``layermount man``: the manual page in roff, written from the same parser as ``--help`` and completion."""

from __future__ import annotations

import argparse
import datetime

SECTIONS_AFTER = """\
.SH EXIT STATUS
.TP
.B 0
success
.TP
.B 1
any other failure (lint: the image has errors; which: the path is not visible)
.TP
.B 2
bad arguments
.TP
.B 3
a bad image (corrupt, hostile, wrong digests)
.TP
.B 4
the layer store
.TP
.B 5
mounting
.PP
.B run
exits with the command's code; 125 when the runtime itself failed.
.SH ENVIRONMENT
.TP
.B LAYERMOUNT_STORE
the layer store when
.B \\-\\-store
is not given
.SH SEE ALSO
.BR fuse-overlayfs (1),
.BR podman-image-mount (1),
.BR umoci (1),
.BR mount.fuse3 (8)
"""


def manual(parser: argparse.ArgumentParser, verbs: dict, version: str) -> str:
    """One page: synopsis of every verb, then each verb with its options and examples."""
    out = [f'.TH LAYERMOUNT 1 "{datetime.date.today():%Y-%m-%d}" "layermount {version}" "User Commands"',
           ".SH NAME", "layermount \\- mount a container image as one root filesystem, and learn its layers",
           ".SH SYNOPSIS"]
    for verb in verbs.values():
        out += [".B layermount", f"{_escape(verb.name)} {_escape(verb.synopsis)}".rstrip(), ".br"]
    out += [".SH DESCRIPTION", _escape(parser.description or ""),
            "Without a verb, the arguments are those of", ".BR mount ."]
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    out.append(".SH COMMANDS")
    for name, sub in commands.choices.items():
        verb = verbs[name]
        out += [f".SS {_escape(name)}", _escape(verb.summary[0].upper() + verb.summary[1:]) + "."]
        if verb.details:
            out += [".PP", _escape(verb.details)]
        out += _options(sub)
        out += [".PP", "Examples:", ".RS", ".nf"] + [_escape(example) for example in verb.examples] + [".fi", ".RE"]
    return "\n".join(out) + "\n" + SECTIONS_AFTER


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                lines += [".TP", f".B {_escape(name)}", _escape(sub.description.split(chr(10))[0])]
                lines += [".RS"] + _options(sub) + [".RE"]
            continue
        if action.option_strings:
            flags = ", ".join(action.option_strings)
            if action.nargs != 0:
                flags += " " + (action.metavar or action.dest.upper())
            label = f".B {_escape(flags)}"
        else:
            label = f".I {_escape(str(action.metavar or action.dest))}"
        text = action.help or ""
        if action.choices and not isinstance(action.choices, dict):
            text += f" (one of {', '.join(map(str, action.choices))})"
        lines += [".TP", label, _escape(text)]
    return lines


def _escape(text: str) -> str:
    """roff: backslashes and hyphens escaped, no line may start with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line if line[:1] in (".", "'") else line) for line in text.split("\n"))
