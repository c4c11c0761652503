"""``layermount lint``: what is odd or dangerous in an image's layers, found by reading the tars only.

Errors are exactly what unpacking would refuse: every member goes through
the extractor's own rules (``LayerRules``) on a dry model of the layer.
Warnings are what unpacks fine but deserves a look before mounting; info is
the same kind of thing where every distribution has it (setuid-root helpers
in the system directories, nodes in /dev).
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass

from ..errors import ImageError
from ..extract import LayerRules, layer_members
from ..image.compression import open_decompressed
from ..image.model import Image
from ..layerform import OPAQUE_MARKER, WHITEOUT_PREFIX, whiteout_target
from ..textsafe import shown

ERROR, WARNING, INFO = "error", "warning", "info"

# Stable ids: scripts may --ignore them. 0xx: unpacking refuses the layer; 1xx: names and
# markers; 2xx: permissions a mount would grant.
RULES = {
    "LM001": "unsafe-member", "LM002": "damaged-tar",
    "LM101": "name-leaves-layer", "LM102": "absolute-name", "LM103": "bare-whiteout",
    "LM104": "whiteout-of-own-file", "LM105": "whiteout-in-opaque-dir",
    "LM201": "setuid-file", "LM202": "device-node", "LM203": "world-writable-dir",
}
USUAL = {"LM201": "setuid or setgid root files in system directories", "LM202": "character devices in /dev"}
# Where every distribution keeps its setuid-root helpers (su, passwd, mount ...) and devices:
# shown as info, so that what is unusual stands out among the warnings.
SYSTEM_DIRS = ("bin/", "sbin/", "usr/bin/", "usr/sbin/", "usr/lib/", "usr/lib64/", "usr/libexec/", "lib/")


@dataclass(frozen=True)
class Finding:
    severity: str
    code: str         # "LM101"; RULES names it
    layer: int        # 1 = the bottom layer, as build steps count
    path: str
    message: str      # may quote names and link targets from the image: escaped when shown

    @property
    def rule(self) -> str:
        return RULES[self.code]

    def __str__(self) -> str:
        return shown(f"{self.severity}: layer {self.layer}: /{self.path}: {self.message} [{self.code} {self.rule}]")

    def as_json(self) -> dict:
        return {"severity": self.severity, "code": self.code, "rule": self.rule, "layer": self.layer,
                "path": "/" + self.path, "message": self.message}


def rule_code(name: str) -> str:
    """``LM201`` or ``setuid-file`` to the rule's id, for ``--ignore``."""
    for code, rule in RULES.items():
        if name.upper() == code or name.lower() == rule:
            return code
    from ..errors import UsageError

    raise UsageError(f"--ignore {name!r}: no such rule (rules: {', '.join(f'{c} {r}' for c, r in RULES.items())})")


def lint_image(image: Image, ignore: frozenset[str] = frozenset()) -> list[Finding]:
    """Every finding, bottom layer first, except those whose rule id is in ``ignore``."""
    findings: list[Finding] = []
    for index, ref in enumerate(image.layers, start=1):
        with ref.open() as blob:
            findings += _lint_layer(index, layer_members(open_decompressed(blob)))
    return [finding for finding in findings if finding.code not in ignore]


def _lint_layer(index: int, members) -> list[Finding]:
    found: list[Finding] = []
    rules = LayerRules()
    added: set[str] = set()
    whiteouts: dict[str, str] = {}     # hidden path -> marker path
    opaque_dirs: set[str] = set()

    def report(severity: str, code: str, path: str, message: str) -> None:
        found.append(Finding(severity, code, index, path, message))

    try:
        for member in members:
            raw = member.name
            path = posixpath.normpath(raw.lstrip("/")) if raw.strip("/") not in ("", ".") else ""
            try:
                rules.admit(member)
            except ImageError as refused:
                report(ERROR, "LM001", raw.lstrip("/"), getattr(refused, "reason", str(refused)))
                continue
            if raw.startswith("/"):
                report(WARNING, "LM102", path, "absolute member name (unpackers strip the leading '/')")
            parent, name = posixpath.split(path)
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_MARKER:
                    opaque_dirs.add(parent)
                    continue
                target = whiteout_target(name)
                if target is None and not name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                    report(WARNING, "LM103", path, "a bare '.wh.' marker, which hides nothing")
                    continue
                if target is not None:
                    whiteouts[posixpath.join(parent, target)] = path
                continue
            added.add(path)
            if member.issym() and not member.linkname.startswith("/"):
                resolved = posixpath.normpath(posixpath.join(parent, member.linkname))
                if resolved == ".." or resolved.startswith("../"):
                    report(WARNING, "LM101", path, f"symlink to '{member.linkname}' climbs above the image root")
            if member.isreg() and member.mode & (stat.S_ISUID | stat.S_ISGID):
                kind = "setuid" if member.mode & stat.S_ISUID else "setgid"
                usual = member.uid == 0 and path.startswith(SYSTEM_DIRS)
                report(INFO if usual else WARNING, "LM201", path,
                       f"{kind} file (owner {member.uid}); the default mount is nosuid")
            if member.ischr() or member.isblk():
                usual = member.ischr() and path.startswith("dev/")
                report(INFO if usual else WARNING, "LM202", path,
                       f"device node {member.devmajor}:{member.devminor}; the default mount is nodev")
            if member.isdir() and member.mode & stat.S_IWOTH and not member.mode & stat.S_ISVTX:
                report(WARNING, "LM203", path, "world-writable directory without the sticky bit")
    except ImageError as exc:         # a damaged tar: nothing after this point can be read
        report(ERROR, "LM002", "", str(exc))
    for hidden, marker in sorted(whiteouts.items()):
        if hidden in added:
            report(WARNING, "LM104", marker, f"whiteout for /{hidden}, which this same layer also adds")
        if posixpath.dirname(hidden) in opaque_dirs:
            report(WARNING, "LM105", marker, "whiteout inside an opaque directory (the opaque marker already hides it)")
    return found
