"""Tar members built in memory for the extraction tests: one (TarInfo, data) pair per member."""

from __future__ import annotations

import io
import tarfile

MTIME = 1_600_000_000


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", pax: dict | None = None,
          **attrs) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, len(data), MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def file(name, data=b"", **attrs):
    return entry(name, tarfile.REGTYPE, data, **attrs)


def directory(name, **attrs):
    return entry(name, tarfile.DIRTYPE, **attrs)


def symlink(name, target, **attrs):
    return entry(name, tarfile.SYMTYPE, linkname=target, **attrs)


def hardlink(name, target, **attrs):
    return entry(name, tarfile.LNKTYPE, linkname=target, **attrs)


def tar_of(*entries, format=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format, pax_headers=pax_headers) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
