"""The ``-o`` option string, in the vocabulary podman, buildah and fuse-overlayfs users speak.

containers/storage runs its ``mount_program`` exactly as it runs fuse-overlayfs, so every
option fuse-overlayfs takes must mean something here: the paths, the FUSE and kernel mount
flags, options that change the merged view (id mappings, squashing, xattr handling, fsync),
and options that tune behaviour layermount already has (``redirect_dir``, ``xino`` ...).
Like fuse-overlayfs, an option nobody knows is warned about and ignored, never fatal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .errors import UsageError

# FUSE and kernel mount flags handed to libfuse as they are.
FUSE_FLAGS = frozenset({"exec", "noexec", "atime", "noatime", "relatime", "strictatime", "sync", "async",
                        "dirsync", "default_permissions", "allow_root", "auto_unmount", "debug"})
FUSE_VALUED = frozenset({"max_read", "blksize"})
# SELinux labels: kernel mount options, taken by the LSM.
SELINUX_VALUED = frozenset({"context", "fscontext", "defcontext", "rootcontext"})
# fuse-overlayfs tuning that layermount already behaves as (or has no use for): accepted, no effect.
NO_EFFECT_FLAGS = frozenset({"userxattr", "static_nlink", "ino32_t", "noacl", "nfs_export", "lazytime"})
NO_EFFECT_VALUED = frozenset({"redirect_dir", "index", "xino", "metacopy", "timeout", "threaded", "fast_ino",
                              "writeback", "max_idle_threads"})


@dataclass(frozen=True)
class IdRange:
    """``length`` ids from ``container`` inside map to ``host`` outside, as in /proc/PID/uid_map."""

    container: int
    host: int
    length: int


@dataclass
class ViewOptions:
    """What changes the merged view itself; built into MergedView where the view is made."""

    volatile: bool = False                     # no fsync on copy-up; fsync answered at once
    uid_map: tuple[IdRange, ...] = ()
    gid_map: tuple[IdRange, ...] = ()
    squash_uid: int | None = None              # every file shown as owned by this uid
    squash_gid: int | None = None
    xattr_permissions: int = 0                 # 1, 2: the upper keeps owners and modes in an xattr
    xattrs: bool = True                        # noxattrs: every xattr call is "not supported"


@dataclass
class ParsedOptions:
    """The whole ``-o`` string, typed; ``None`` for a flag means "the mode's default"."""

    lowerdirs: list[str] | None = None
    upperdir: str | None = None
    workdir: str | None = None
    read_only: bool = False
    suid: bool | None = None
    dev: bool | None = None
    allow_other: bool | None = None
    selinux: dict[str, str] = field(default_factory=dict)
    fuse: list[str] = field(default_factory=list)
    view: ViewOptions = field(default_factory=ViewOptions)
    no_effect: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)

    @property
    def has_paths(self) -> bool:
        return self.lowerdirs is not None or self.upperdir is not None or self.workdir is not None


def shown(text: str) -> str:
    """An option fit for a one-line message: control characters escaped, very long ones elided."""
    text = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return text if len(text) <= 120 else text[:60] + "..." + text[-40:]


def split_options(text: str) -> list[str]:
    """Split at commas outside double quotes; a backslash escapes the next character; empty items go."""
    items, current, quoted, escaped = [], [], False, False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
            current.append(char)
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise UsageError(f"-o {shown(text)}: a double quote is not closed")
    items.append("".join(current))
    return [item for item in items if item]


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def parse_id_mapping(option: str, value: str) -> tuple[IdRange, ...]:
    """fuse-overlayfs' ``[:]CONTAINER:HOST:LEN[:CONTAINER:HOST:LEN...]`` (a leading colon is allowed)."""
    fields = value[1:].split(":") if value.startswith(":") else value.split(":")
    if not value or len(fields) % 3:
        raise UsageError(f"{option}={shown(value)}: expected CONTAINER:HOST:LENGTH triples separated by ':'")
    if not all(_decimal(number) for number in fields):
        raise UsageError(f"{option}={shown(value)}: ids and lengths must be decimal numbers")
    numbers = [int(number) for number in fields]
    ranges = []
    for start in range(0, len(numbers), 3):
        container, host, length = numbers[start:start + 3]
        if length == 0 or max(container, host) + length > 1 << 32:
            raise UsageError(f"{option}={shown(value)}: range {container}:{host}:{length} is empty or "
                             f"goes past 2^32")
        ranges.append(IdRange(container, host, length))
    for kind, ends in (("container", [(r.container, r.length) for r in ranges]),
                       ("host", [(r.host, r.length) for r in ranges])):
        ends.sort()
        for (first, length), (second, _) in zip(ends, ends[1:]):
            if first + length > second:
                raise UsageError(f"{option}={shown(value)}: {kind} ranges overlap")
    return tuple(ranges)


def _decimal(text: str) -> bool:
    """ASCII digits only: int() would also take '+1', ' 1', '1_000' and other scripts' digits."""
    return text.isascii() and text.isdigit()


def _id_number(option: str, value: str) -> int:
    if not _decimal(value) or int(value) >= 1 << 32:
        raise UsageError(f"{option}={shown(value)}: expected a uid/gid number")
    return int(value)


def _switch(option: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise UsageError(f"{option}={shown(value)}: expected 0 or 1")
    return value == "1"


def parse(groups: list[str]) -> ParsedOptions:
    """Every ``-o`` argument, in order (a later option wins over an earlier one)."""
    parsed = ParsedOptions()
    view = parsed.view
    squash_to_root = False
    for group in groups:
        for item in split_options(group):
            key, has_value, value = item.partition("=")
            if key in ("lowerdir", "upperdir", "workdir"):
                if not value:
                    raise UsageError(f"{key}= names no directory")
                if key == "lowerdir":
                    parsed.lowerdirs = [path for path in value.split(":") if path]
                else:
                    setattr(parsed, key, value)
            elif item in ("ro", "rw"):
                parsed.read_only = item == "ro"
            elif item in ("suid", "nosuid"):
                parsed.suid = item == "suid"
            elif item in ("dev", "nodev"):
                parsed.dev = item == "dev"
            elif item == "allow_other":
                parsed.allow_other = True
            elif item in FUSE_FLAGS or (has_value and key in FUSE_VALUED):
                parsed.fuse.append(item)
            elif has_value and key in SELINUX_VALUED:
                parsed.selinux[key] = unquote(value)
            elif item == "volatile":
                view.volatile = True
            elif key == "fsync" and has_value:
                view.volatile = not _switch(key, value)
            elif key in ("uidmapping", "gidmapping") and has_value:
                setattr(view, "uid_map" if key == "uidmapping" else "gid_map", parse_id_mapping(key, value))
            elif item == "squash_to_root":
                squash_to_root = True
            elif key == "squash_to_uid" and has_value:
                view.squash_uid = _id_number(key, value)
            elif key == "squash_to_gid" and has_value:
                view.squash_gid = _id_number(key, value)
            elif key == "xattr_permissions" and has_value:
                if value not in ("0", "1", "2"):
                    raise UsageError(f"xattr_permissions={shown(value)}: expected 0, 1 or 2")
                view.xattr_permissions = int(value)
            elif key == "noxattrs":
                view.xattrs = not (_switch(key, value) if has_value else True)
            elif item in NO_EFFECT_FLAGS or (has_value and key in NO_EFFECT_VALUED):
                parsed.no_effect.append(item)
            else:
                parsed.unknown.append(item)
    if squash_to_root:   # squash_to_uid= and squash_to_gid= win over it, wherever they stand
        view.squash_uid = 0 if view.squash_uid is None else view.squash_uid
        view.squash_gid = 0 if view.squash_gid is None else view.squash_gid
    return parsed


def selinux_enabled() -> bool:
    return os.path.isdir("/sys/fs/selinux")


def fuse_passthrough(parsed: ParsedOptions, selinux: bool | None = None) -> tuple[list[str], list[str]]:
    """(options for libfuse, warnings for stderr).

    SELinux labels are quoted for the LSM and their commas escaped for libfuse's own split at
    commas. Without SELinux no one in the kernel takes them and the mount would fail, so they
    are dropped with a warning (fuse-overlayfs, too, mounts without them there).
    """
    options = list(parsed.fuse)
    warnings = [f"unknown option ignored: {shown(item)}" for item in parsed.unknown]
    if parsed.selinux and not (selinux_enabled() if selinux is None else selinux):
        warnings.append(f"{', '.join(key + '=' for key in parsed.selinux)} ignored: SELinux is not enabled")
    else:
        options += [f'{key}="{value}"'.replace("\\", "\\\\").replace(",", "\\,")
                    for key, value in parsed.selinux.items()]
    return options, warnings
