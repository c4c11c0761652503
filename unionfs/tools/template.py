"""``--format '{{.Config.Cmd}}'``: the common part of Go's text/template, as docker and podman users type it.

Supported: ``{{.}}``, ``{{.Field.Sub}}`` and ``{{json .Field}}``, with text between
them. Values print as Go prints them (``[a b]`` for a list, ``map[k:v]`` for
an object, ``<no value>`` for what is missing); anything else is a usage error
rather than a guess.
"""

from __future__ import annotations

import json
import re

from ..errors import UsageError

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_FIELD = re.compile(r"(json\s+)?(\.|(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def render(template: str, data: object) -> str:
    """``template`` with each action replaced by the value it names in ``data``."""
    out, position = [], 0
    for action in _ACTION.finditer(template):
        out.append(_unescape(template[position:action.start()]))
        out.append(_value(action.group(1), data))
        position = action.end()
    rest = template[position:]
    if "{{" in rest or "}}" in rest:
        raise UsageError(f"--format {template!r}: an unclosed {{{{ }}}}")
    out.append(_unescape(rest))
    return "".join(out)


def _value(action: str, data: object) -> str:
    match = _FIELD.fullmatch(action)
    if match is None:
        raise UsageError(f"--format: {{{{{action}}}}} is not supported (only {{{{.Field.Sub}}}} and "
                         f"{{{{json .Field}}}}); use --json and jq for more")
    value = data
    for name in filter(None, match.group(2).split(".")):
        value = value.get(name) if isinstance(value, dict) else None
        if value is None:
            break
    if match.group(1):
        return json.dumps(value)
    return _go(value, top=True)


def _go(value: object, top: bool = False) -> str:
    if value is None:
        return "<no value>" if top else "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(_go(item) for item in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{key}:{_go(value[key])}" for key in sorted(value)) + "]"
    return str(value)


def _unescape(text: str) -> str:
    r"""docker's --format takes ``\n`` and ``\t`` typed in the shell as newline and tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
