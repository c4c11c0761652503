"""``layermount lint``: what is odd or dangerous in an image's layers, found by reading the tars only.

Errors are exactly what unpacking would refuse: every member goes through
the extractor's own rules (``LayerRules``) on a dry model of the layer.
Warnings are what unpacks fine but deserves a look before mounting.
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

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    severity: str
    layer: int        # 1 = the bottom layer, as build steps count
    path: str
    rule: str         # may quote names and link targets from the image: escaped when shown

    def __str__(self) -> str:
        return shown(f"{self.severity}: layer {self.layer}: /{self.path}: {self.rule}")


def lint_image(image: Image) -> list[Finding]:
    findings: list[Finding] = []
    for index, ref in enumerate(image.layers, start=1):
        with ref.open() as blob:
            findings += _lint_layer(index, layer_members(open_decompressed(blob)))
    return findings


def _lint_layer(index: int, members) -> list[Finding]:
    found: list[Finding] = []
    rules = LayerRules()
    added: set[str] = set()
    whiteouts: dict[str, str] = {}     # hidden path -> marker path
    opaque_dirs: set[str] = set()

    def report(severity: str, path: str, rule: str) -> None:
        found.append(Finding(severity, index, path, rule))

    try:
        for member in members:
            raw = member.name
            path = posixpath.normpath(raw.lstrip("/")) if raw.strip("/") not in ("", ".") else ""
            try:
                rules.admit(member)
            except ImageError as refused:
                report(ERROR, raw.lstrip("/"), getattr(refused, "reason", str(refused)))
                continue
            if raw.startswith("/"):
                report(WARNING, path, "absolute member name (unpackers strip the leading '/')")
            parent, name = posixpath.split(path)
            if name.startswith(WHITEOUT_PREFIX):
                if name == OPAQUE_MARKER:
                    opaque_dirs.add(parent)
                    continue
                target = whiteout_target(name)
                if target is None and not name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                    report(WARNING, path, "a bare '.wh.' marker, which hides nothing")
                    continue
                if target is not None:
                    whiteouts[posixpath.join(parent, target)] = path
                continue
            added.add(path)
            if member.issym() and not member.linkname.startswith("/"):
                resolved = posixpath.normpath(posixpath.join(parent, member.linkname))
                if resolved == ".." or resolved.startswith("../"):
                    report(WARNING, path, f"symlink to '{member.linkname}' climbs above the image root")
            if member.isreg() and member.mode & (stat.S_ISUID | stat.S_ISGID):
                kind = "setuid" if member.mode & stat.S_ISUID else "setgid"
                report(WARNING, path, f"{kind} file (owner {member.uid}); the default mount is nosuid")
            if member.ischr() or member.isblk():
                report(WARNING, path, f"device node {member.devmajor}:{member.devminor}; the default mount is nodev")
            if member.isdir() and member.mode & stat.S_IWOTH and not member.mode & stat.S_ISVTX:
                report(WARNING, path, "world-writable directory without the sticky bit")
    except ImageError as exc:         # a damaged tar: nothing after this point can be read
        report(ERROR, "", str(exc))
    for hidden, marker in sorted(whiteouts.items()):
        if hidden in added:
            report(WARNING, marker, f"whiteout for /{hidden}, which this same layer also adds")
        if posixpath.dirname(hidden) in opaque_dirs:
            report(WARNING, marker, "whiteout inside an opaque directory (the opaque marker already hides it)")
    return found
