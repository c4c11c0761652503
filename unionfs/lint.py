"""``layermount lint``: what is odd or dangerous in an image's layers, found by reading the tars only."""

from __future__ import annotations

import posixpath
import stat
import tarfile
from dataclasses import dataclass

from .errors import ImageError
from .image.compression import open_decompressed
from .image.model import Image
from .layerform import OPAQUE_MARKER, WHITEOUT_PREFIX, whiteout_target

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    severity: str
    layer: int        # 1 = the bottom layer, as build steps count
    path: str
    rule: str

    def __str__(self) -> str:
        return f"{self.severity}: layer {self.layer}: /{self.path}: {self.rule}"


def lint_image(image: Image) -> list[Finding]:
    findings: list[Finding] = []
    for index, ref in enumerate(image.layers, start=1):
        with ref.open() as blob:
            try:
                with tarfile.open(fileobj=open_decompressed(blob), mode="r|") as archive:
                    findings += _lint_layer(index, archive)
            except tarfile.TarError as exc:
                findings.append(Finding(ERROR, index, "", f"not a readable tar: {exc}"))
            except ImageError as exc:
                findings.append(Finding(ERROR, index, "", str(exc)))
    return findings


def _lint_layer(index: int, archive: tarfile.TarFile) -> list[Finding]:
    found: list[Finding] = []
    added: set[str] = set()
    whiteouts: dict[str, str] = {}     # hidden path -> marker path
    opaque_dirs: set[str] = set()

    def report(severity: str, path: str, rule: str) -> None:
        found.append(Finding(severity, index, path, rule))

    for member in archive:
        raw = member.name
        path = posixpath.normpath(raw.lstrip("/")) if raw.strip("/") not in ("", ".") else ""
        if raw.startswith("/"):
            report(WARNING, path, "absolute member name (unpackers strip the leading '/')")
        if path == ".." or path.startswith("../") or "/../" in f"/{raw}/":
            report(ERROR, raw, "member name leaves the layer with '..'")
            continue
        parent, name = posixpath.split(path)
        if name.startswith(WHITEOUT_PREFIX):
            if name == OPAQUE_MARKER:
                opaque_dirs.add(parent)
                continue
            target = whiteout_target(name)
            if target is None and not name.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
                report(ERROR, path, "whiteout of nothing, '.' or '..' (a bare '.wh.' marker)")
                continue
            if target is not None:
                whiteouts[posixpath.join(parent, target)] = path
            continue
        added.add(path)
        if member.islnk():
            link = member.linkname
            if link.startswith("/") or posixpath.normpath(link).startswith(".."):
                report(ERROR, path, f"hardlink to '{link}', outside the layer")
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
    for hidden, marker in sorted(whiteouts.items()):
        if hidden in added:
            report(WARNING, marker, f"whiteout for /{hidden}, which this same layer also adds")
        if posixpath.dirname(hidden) in opaque_dirs:
            report(WARNING, marker, "whiteout inside an opaque directory (the opaque marker already hides it)")
    return found
