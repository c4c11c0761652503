"""Unpack one layer tar into an empty directory, safely, in a single forward pass.

Every member is created relative to directory fds opened with O_NOFOLLOW,
one component at a time from the layer directory, so no name, symlink or
hardlink in a hostile tar can reach outside it: the classic escapes go
through a symlink an earlier member planted, or (umoci's CVE-2021-29136)
through replacing the root itself. tarfile's own extract is never used: it
resolves paths with the kernel and follows what it finds, and its 'data'
filter drops what a root filesystem needs (devices, absolute symlinks, owners).

Without privileges (rootless) owners, special modes and device nodes cannot
be made for real; each entry then records them in the
``user.containers.override_stat`` xattr, as containers/storage and
fuse-overlayfs do, and the overlay serves that instead of the real inode.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import BinaryIO, Callable, Iterator

from .errors import ImageError, LayermountError, UnsafeArchive
from .layerform import HIDDEN_XATTR_PREFIXES, OVERRIDE_XATTR, Override
from .safepath import fd_path
from .textsafe import shown

PATH_MAX = 4095            # bytes in a relative path, as the kernel counts them (without the NUL)
NAME_MAX = 255
CHUNK = 1 << 20
# A pax or GNU long-name header is read into memory whole; real ones are a few KiB.
MAX_EXTENDED_HEADER = 8 << 20
# Open directory fds kept while unpacking; members arrive grouped by directory,
# so a small LRU saves nearly every re-walk without nearing RLIMIT_NOFILE.
DIR_CACHE_SIZE = 128
MAX_ID = 0xFFFFFFFE        # (uid_t)-1 means "unchanged" to chown(2)
MAX_MTIME_SECONDS = (1 << 63) // 1_000_000_000   # what nanoseconds in an int64 can hold

DIR_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# chown(2) refusals that mean "not allowed to give this owner" (no CAP_CHOWN, or
# an id unmapped in this user namespace): the owner then goes to the override xattr.
CANNOT_CHOWN = (errno.EPERM, errno.EINVAL)
# Failures of the store's filesystem or of this process, not of the archive:
# they escape as OSError for the caller to report against the store.
STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES,
                          errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EOPNOTSUPP})
REGULAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
SPECIAL_TYPES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK, tarfile.FIFOTYPE: stat.S_IFIFO}
EXTENDED_HEADER_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
                         tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
XATTR_PAX_PREFIX = "SCHILY.xattr."
WHITEOUTS_OF_DOTS = {b".wh..": ".", b".wh...": ".."}


@dataclass
class ExtractStats:
    """What one layer unpacked to, for the store's layer record."""

    entries: int = 0          # tar members processed
    bytes: int = 0            # file data written (holes of sparse files not counted)
    overrides: bool = False   # some owner or mode lives in the override xattr, not the inode


def extract_layer(tar_stream: BinaryIO, dest: str | os.PathLike, *, rootless: bool | None = None) -> ExtractStats:
    """Unpack the uncompressed layer tar ``tar_stream`` into the existing empty directory ``dest``.

    The stream is read forward only, at most CHUNK bytes past the archive's
    end, and left open for the caller to hash and drain. Raises UnsafeArchive for a member
    that would escape ``dest`` or is otherwise hostile, ImageError for a
    corrupt tar; OSError only for failures of the destination filesystem.
    """
    if rootless is None:
        rootless = os.geteuid() != 0
    extractor = _Extractor(dest, rootless)
    try:
        tar = _read_tar(lambda: tarfile.open(fileobj=_ForwardReader(tar_stream), mode="r:", tarinfo=_StrictTarInfo))
        with contextlib.closing(tar):
            for member in _members(tar):
                extractor.add(tar, member)
        extractor.finish()
    finally:
        extractor.close()
    return extractor.stats


def layer_members(tar_stream: BinaryIO) -> Iterator[tarfile.TarInfo]:
    """The members of an uncompressed layer tar, parsed as strictly as extraction parses them."""
    tar = _read_tar(lambda: tarfile.open(fileobj=tar_stream, mode="r|", tarinfo=_StrictTarInfo))
    with contextlib.closing(tar):
        yield from _members(tar)


def _member_error(kind: type, member: str, reason: str) -> ImageError:
    """The user-facing error for ``member``; ``reason`` alone is kept for lint to show beside the path."""
    error = kind(f"member '{_shown(member)}': {reason}")
    error.member, error.reason = member, reason
    return error


def _shown(name: str) -> str:
    """A name fit for a one-line message: control characters escaped, very long names elided."""
    return shown(name, 120)


class _Hostile(Exception):
    """A member would escape or subvert the layer; reported as UnsafeArchive naming it."""


class _Unusable(Exception):
    """A member that cannot be unpacked as written; reported as ImageError naming it."""


class _blame:
    """Turn failures while unpacking ``member`` into the user-facing error naming it.

    A class rather than a generator context manager: it wraps every member twice.
    """

    __slots__ = ("member",)

    def __init__(self, member: str):
        self.member = member

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, traceback) -> bool:
        if kind is None:
            return False
        if issubclass(kind, _Hostile):
            raise _member_error(UnsafeArchive, self.member, str(exc)) from None
        if issubclass(kind, _Unusable):
            raise _member_error(ImageError, self.member, str(exc)) from None
        if issubclass(kind, OSError) and exc.errno not in STORE_ERRNOS:
            raise _member_error(ImageError, self.member, exc.strerror or str(exc)) from None
        return False


def _read_tar(read: Callable, relation: str = "", member: tarfile.TarInfo | None = None):
    """Call a tarfile read; any failure of it means the archive (or its stream) is damaged.

    ``relation`` ("in", "after") and ``member`` say where, for the message.
    """
    try:
        return read()
    except LayermountError as exc:
        if member is None or "member" in str(exc):
            raise
        # A damaged compressed stream is found while reading some member: name it.
        raise type(exc)(f"{exc} {relation} member '{_shown(member.name)}'") from None
    except Exception as exc:   # tarfile surfaces damage as TarError, ValueError, EOFError, RecursionError ...
        where = f"{relation} member '{_shown(member.name)}'" if member is not None else "at its start"
        raise ImageError(f"corrupt tar {where}: {exc or type(exc).__name__}") from None


def _space_left(target: int | bytes) -> bool:
    """ENOSPC from setxattr means a full inode, not a full disk, while blocks remain."""
    try:
        st = os.fstatvfs(target) if isinstance(target, int) else os.statvfs(target)
    except OSError:
        return False
    return st.f_bavail > 0


# name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, (magic, version),
# uname, gname, devmajor, devminor, prefix: the fields tarfile's frombuf reads.
_USTAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s12x")


def _octals(*fields: bytes) -> list[int]:
    """Number fields as tarfile reads them, for the plain octal form; ValueError for any other.

    int() of bytes accepts a subset of what tarfile's str-based parse does
    (no base-256, no exotic whitespace), with the same value where it accepts.
    """
    return [int(field.partition(b"\0")[0] or b"0", 8) for field in fields]


class _StrictTarInfo(tarfile.TarInfo):
    """Header parsing that reports a damaged header instead of taking it for the archive's end.

    tarfile stops quietly at a bad checksum or a short header after the
    first member, which would unpack half a layer and call it complete.
    """

    @classmethod
    def fromtarfile(cls, tar):
        position = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):
            raise                  # the end-of-archive blocks, or a stream that simply ends
        except LayermountError:
            raise
        except Exception as exc:
            raise ImageError(f"corrupt tar at byte {position}: {exc or type(exc).__name__}") from None

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        """tarfile's own parse of one header block, in a quarter of its time for the common header.

        That header (octal numbers, an unsigned checksum, no old GNU sparse
        map) is parsed here; any other block, damaged ones included, goes to
        tarfile, so what this returns or raises is always what tarfile would.
        """
        if len(buf) != tarfile.BLOCKSIZE or buf[156:157] == tarfile.GNUTYPE_SPARSE:
            return super().frombuf(buf, encoding, errors)
        (name, mode, uid, gid, size, mtime, checksum, kind, linkname,
         uname, gname, devmajor, devminor, prefix) = _USTAR_HEADER.unpack(buf)
        try:
            checksum, mode, uid, gid, size, mtime, devmajor, devminor = _octals(
                checksum, mode, uid, gid, size, mtime, devmajor, devminor)
            if checksum != 256 + sum(buf) - sum(buf[148:156]):   # the field itself counts as spaces
                raise ValueError("not the unsigned checksum")
        except ValueError:
            return super().frombuf(buf, encoding, errors)
        obj = cls()
        obj.mode, obj.uid, obj.gid, obj.size, obj.mtime = mode, uid, gid, size, mtime
        obj.devmajor, obj.devminor = devmajor, devminor
        obj.chksum = checksum
        obj.type = kind
        obj.name = name.partition(b"\0")[0].decode(encoding, errors)
        obj.linkname = linkname.partition(b"\0")[0].decode(encoding, errors)
        obj.uname = uname.partition(b"\0")[0].decode(encoding, errors)
        obj.gname = gname.partition(b"\0")[0].decode(encoding, errors)
        prefix = prefix.partition(b"\0")[0].decode(encoding, errors)
        if kind == tarfile.AREGTYPE and obj.name.endswith("/"):
            obj.type = tarfile.DIRTYPE      # the old V7 form of a directory
        if obj.isdir():
            obj.name = obj.name.rstrip("/")
        if prefix and obj.type not in tarfile.GNU_TYPES:
            obj.name = prefix + "/" + obj.name
        return obj

    def _proc_member(self, tar):
        if self.type in EXTENDED_HEADER_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise ImageError(f"corrupt tar at byte {self.offset}: extended header of {self.size} bytes")
        return super()._proc_member(tar)


class _ForwardReader:
    """A forward-only stream as tarfile's file mode ("r:") reads one: whole reads, tell, seeks ahead.

    Its stream mode ("r|") would pass every byte through 10 KiB records and
    a copy; this serves headers and data as slices of the stream's own chunks.
    A seek back is refused, so nothing can be read twice.
    """

    def __init__(self, stream: BinaryIO):
        self._stream = stream
        self._buffer = b""
        self._offset = 0           # of the next byte in _buffer
        self._start = 0            # stream position of _buffer[0]

    def tell(self) -> int:
        return self._start + self._offset

    def read(self, size: int) -> bytes:
        end = self._offset + size
        if end <= len(self._buffer):
            data = self._buffer[self._offset:end]
            self._offset = end
            return data
        parts = [self._buffer[self._offset:]]
        self._take(size - len(parts[0]), parts)
        return b"".join(parts)

    def read_some(self, size: int) -> memoryview:
        """Up to ``size`` bytes as a view of the chunk they are in, so file data is never copied here.

        Fewer at a chunk's end; empty only at the stream's end.
        """
        if self._offset >= len(self._buffer):
            self._start += len(self._buffer)
            self._buffer, self._offset = self._stream.read(CHUNK), 0
        end = min(self._offset + size, len(self._buffer))
        view = memoryview(self._buffer)[self._offset:end]
        self._offset = end
        return view

    def seek(self, position: int, whence: int = os.SEEK_SET) -> int:
        skip = position - (self._start + self._offset)
        if whence != os.SEEK_SET or skip < 0:
            raise tarfile.StreamError("seeking backwards is not allowed")
        if self._offset + skip <= len(self._buffer):
            self._offset += skip
        else:
            self._take(skip - (len(self._buffer) - self._offset), None)
        return self._start + self._offset

    def _take(self, wanted: int, parts: list[bytes] | None) -> None:
        """Move past the buffer and ``wanted`` more bytes of the stream, keeping them in ``parts`` if given."""
        self._start += len(self._buffer)
        self._buffer, self._offset = b"", 0
        while wanted > 0:
            chunk = self._stream.read(CHUNK)
            if not chunk:
                return
            if len(chunk) > wanted:
                self._buffer, self._offset = chunk, wanted
                chunk = chunk[:wanted]
            else:
                self._start += len(chunk)
            if parts is not None:
                parts.append(chunk)
            wanted -= len(chunk)


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    previous = None
    while True:
        member = _read_tar(tar.next, "after", previous)
        if member is None:
            return
        # tarfile keeps every member for name lookups we never make; a layer of
        # a million files would otherwise hold them all in memory.
        tar.members.clear()
        yield member
        previous = member


@dataclass
class _Meta:
    """Owner, mode, time and xattrs of one entry, checked for range once."""

    name: str                 # the member, for messages
    uid: int
    gid: int
    mode: int                 # permission bits with setuid/setgid/sticky
    mtime_ns: int | None      # None: leave the time of creation
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, member: tarfile.TarInfo) -> "_Meta":
        for what, value in (("uid", member.uid), ("gid", member.gid)):
            if not 0 <= value <= MAX_ID:
                raise _Unusable(f"{what} {value} out of range")
        xattrs = {}
        for key, value in member.pax_headers.items():
            if key.startswith(XATTR_PAX_PREFIX):
                name = key[len(XATTR_PAX_PREFIX):]
                if not name or "\0" in name:
                    raise _Unusable(f"invalid xattr name {name!r}")
                xattrs[name] = value.encode("utf-8", "surrogateescape")
        return cls(member.name, member.uid, member.gid, stat.S_IMODE(member.mode), _mtime_ns(member), xattrs)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The mtime in ns, exact for pax decimal times (tarfile's float would round them)."""
    text = member.pax_headers.get("mtime")
    try:
        seconds = Decimal(text) if text is not None else member.mtime
        if not -MAX_MTIME_SECONDS < seconds < MAX_MTIME_SECONDS:   # NaN raises InvalidOperation here
            raise InvalidOperation
    except InvalidOperation:
        raise _Unusable(f"mtime {text or member.mtime!r} out of range") from None
    return int(seconds * 1_000_000_000)


def _components(name: str, role: str) -> list[bytes]:
    """A member path as components below the layer root; refuses any way out of it.

    Leading '/' and './' are dropped as GNU tar does; '' and '.' are the root.
    """
    raw = os.fsencode(name)
    if b"\0" in raw:
        raise _Hostile(f"{role} contains a NUL byte")
    parts = [part for part in raw.split(b"/") if part not in (b"", b".")]
    if b".." in parts:
        raise _Hostile(f"{role} has a '..' component")
    if len(raw) <= NAME_MAX:
        return parts           # so no component and not the whole is too long
    if len(b"/".join(parts)) > PATH_MAX:
        raise _Hostile(f"{role} is longer than PATH_MAX ({PATH_MAX} bytes)")
    for part in parts:
        if len(part) > NAME_MAX:
            raise _Hostile(f"{role} has a component longer than NAME_MAX ({NAME_MAX} bytes)")
    return parts


def _data_segments(member: tarfile.TarInfo) -> list[tuple[int, int]]:
    """(offset, length) of the bytes a member stores, in file order; the rest of a sparse file is holes."""
    if member.sparse is None:
        return [(0, member.size)] if member.size else []
    segments = []
    end = 0
    for offset, length in member.sparse:
        if length == 0:            # GNU tar pads its maps with empty entries
            continue
        if offset < end or offset + length > member.size:
            raise _Unusable("corrupt sparse map")
        segments.append((offset, length))
        end = offset + length
    return segments


DIRECTORY, SYMLINK, OTHER = "directory", "symlink", "other"


class LayerRules:
    """The shape of the layer so far (what kind of entry is at each path) and the rules a member must pass.

    Extraction admits every member here before touching the disk, and
    ``lint`` runs the same model dry, so lint calls an error exactly what
    unpack refuses. The kernel's O_NOFOLLOW walk stays as a second line.
    """

    def __init__(self) -> None:
        self.kinds: dict[bytes, str] = {b"": DIRECTORY}       # every entry made so far
        self.children: dict[bytes, set[bytes]] = {b"": set()}  # directory -> the names in it

    def admit(self, member: tarfile.TarInfo) -> tuple[list[bytes], _Meta, list[bytes] | None]:
        """(components, metadata, hardlink target) of an acceptable member, recorded as made.

        Raises UnsafeArchive or ImageError naming the member otherwise.
        """
        with _blame(member.name):
            parts = _components(member.name, "path")
            if parts and parts[-1] in WHITEOUTS_OF_DOTS:
                raise _Hostile(f"whiteout of '{WHITEOUTS_OF_DOTS[parts[-1]]}'")
            meta = _Meta.of(member)
            target = None
            if member.isdir():
                kind = DIRECTORY
            elif not parts:
                raise _Hostile("would replace the layer root with a non-directory")
            elif member.issym():
                raw_target = os.fsencode(member.linkname)
                if b"\0" in raw_target:
                    raise _Hostile("symlink target contains a NUL byte")
                if not raw_target:
                    raise _Unusable("symlink has an empty target")
                kind = SYMLINK
            elif member.islnk():
                target, kind = self._link_target(parts, member.linkname)
            else:
                if member.type in SPECIAL_TYPES and SPECIAL_TYPES[member.type] != stat.S_IFIFO:
                    if not all(0 <= number <= 0xFFFFFFFF for number in (member.devmajor, member.devminor)):
                        raise _Unusable(f"device number {member.devmajor}:{member.devminor} out of range")
                kind = OTHER
            if parts and target != parts:
                self._check_parents(parts)
                self._place(parts, kind)
            return parts, meta, target

    def _link_target(self, parts: list[bytes], linkname: str) -> tuple[list[bytes], str]:
        target = _components(linkname, f"hardlink target '{_shown(linkname)}'")
        kind = self.kinds.get(b"/".join(target))
        # A target under the link's own path goes when that path is replaced.
        if kind is None or (target[:len(parts)] == parts and target != parts):
            raise _Hostile(f"hardlink to '{_shown(linkname)}' which is not in this layer (or not yet seen)")
        if kind == DIRECTORY:
            raise _Hostile(f"hardlink to directory '{_shown(linkname)}'")
        return target, kind

    def _check_parents(self, parts: list[bytes]) -> None:
        """Every parent must be a directory (missing ones are made): never a symlink or a file."""
        if self.kinds.get(b"/".join(parts[:-1])) == DIRECTORY:
            return                 # and so are all its ancestors: nothing else can have children
        for depth in range(1, len(parts)):
            path = b"/".join(parts[:depth])
            kind = self.kinds.get(path)
            if kind is None:
                self._place(parts[:depth], DIRECTORY)
            elif kind == SYMLINK:
                raise _Hostile(f"parent '{_shown(os.fsdecode(path))}' is a symlink")
            elif kind != DIRECTORY:
                raise _Hostile(f"parent '{_shown(os.fsdecode(path))}' is not a directory")

    def _place(self, parts: list[bytes], kind: str) -> None:
        """Record ``kind`` at ``parts``, dropping the tree it replaces (a directory stays one)."""
        path = b"/".join(parts)
        previous = self.kinds.get(path)
        if previous == DIRECTORY and kind == DIRECTORY:
            return
        if previous == DIRECTORY:
            self._drop_tree(path)
        self.kinds[path] = kind
        self.children[b"/".join(parts[:-1])].add(parts[-1])
        if kind == DIRECTORY:
            self.children[path] = set()

    def _drop_tree(self, top: bytes) -> None:
        """Forget everything below the directory ``top``, with a loop, not recursion."""
        pending = [top]
        while pending:
            path = pending.pop()
            for name in self.children.pop(path, ()):
                child = path + b"/" + name
                if self.kinds.pop(child, None) == DIRECTORY:
                    pending.append(child)


class _Extractor:
    """The state of one unpack: the layer root fd, cached directory fds and what exists so far."""

    def __init__(self, dest: str | os.PathLike, rootless: bool):
        self.rootless = rootless
        self.stats = ExtractStats()
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.owner = (os.geteuid(), os.getegid())
        self.create_umask = None if rootless else _umask_if_creation_is_plain(self.root_fd, self.owner[1])
        self.dir_fds: OrderedDict[bytes, int] = OrderedDict()    # relative path -> open fd, LRU order
        self.rules = LayerRules()
        # Directory metadata is applied last, deepest first: creating children
        # would change their mtimes, and a 0555 directory would refuse them.
        self.pending_dirs: dict[bytes, _Meta] = {}

    def close(self) -> None:
        for fd in self.dir_fds.values():
            os.close(fd)
        self.dir_fds.clear()
        os.close(self.root_fd)

    # ---- members ---------------------------------------------------------
    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.stats.entries += 1
        parts, meta, link_target = self.rules.admit(member)
        with _blame(member.name):
            kind = member.type
            if kind in REGULAR_TYPES:
                self._regular(parts, meta, lambda fd: self._copy_data(tar, member, fd))
            elif kind == tarfile.DIRTYPE:
                self._directory(parts, meta)
            elif kind == tarfile.SYMTYPE:
                self._symlink(parts, member.linkname, meta)
            elif kind == tarfile.LNKTYPE:
                self._hardlink(parts, link_target)
            elif kind in SPECIAL_TYPES:
                self._special(parts, member, meta)
            else:                  # contiguous, sparse, and unknown types are files, as GNU tar does
                self._regular(parts, meta, lambda fd: self._copy_data(tar, member, fd))

    def _directory(self, parts: list[bytes], meta: _Meta) -> None:
        path = b"/".join(parts)
        if parts:
            parent = self._parent_fd(parts)
            try:
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False).st_mode):
                    os.unlink(parts[-1], dir_fd=parent)
                    os.mkdir(parts[-1], 0o700, dir_fd=parent)
        self.pending_dirs[path] = meta

    def _regular(self, parts: list[bytes], meta: _Meta, write: Callable[[int], None],
                 file_type: int = stat.S_IFREG, device: tuple[int, int] | None = None) -> None:
        """A regular file, or a stand-in for a node this process may not make (see _special)."""
        name = parts[-1]
        # A file of our own owner whose mode the umask leaves whole is made with its mode: its
        # inode is then complete without chown and chmod (see _umask_if_creation_is_plain).
        complete = (file_type == stat.S_IFREG and self.create_umask is not None
                    and (meta.uid, meta.gid) == self.owner and not meta.mode & self.create_umask)
        mode = meta.mode if complete else 0o600
        fd = self._create(parts, lambda parent: os.open(name, FILE_CREATE_FLAGS, mode, dir_fd=parent))
        try:
            write(fd)
            if complete:
                self._set_xattrs(fd, meta.xattrs)
                if meta.mtime_ns is not None:
                    os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))
            else:
                self._apply_to_fd(fd, meta, file_type, device)
        finally:
            os.close(fd)

    def _copy_data(self, tar: tarfile.TarFile, member: tarfile.TarInfo, fd: int) -> None:
        if member.sparse is None:
            self._copy_contiguous(tar.fileobj, member, fd)
            return
        # The raw reader reads at positions and makes no bytes for holes, so a
        # sparse member's holes stay holes (and a huge one costs nothing).
        source = tar.extractfile(member).raw
        for offset, length in _data_segments(member):
            source.seek(offset)
            os.lseek(fd, offset, os.SEEK_SET)
            while length:
                chunk = _read_tar(lambda: source.read(min(CHUNK, length)), "in", member)
                if not chunk:
                    raise ImageError(f"corrupt tar in member '{_shown(member.name)}': unexpected end of data")
                _write_all(fd, chunk)
                self.stats.bytes += len(chunk)
                length -= len(chunk)
        try:
            os.ftruncate(fd, member.size)
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):
                raise _Unusable(f"sparse size {member.size} is too large for the store's filesystem") from None
            raise

    def _copy_contiguous(self, reader: _ForwardReader, member: tarfile.TarInfo, fd: int) -> None:
        """A plain member's bytes, written from the reader's chunks to the fresh fd (at offset 0)."""
        length = member.size
        if not length:
            return
        reader.seek(member.offset_data)
        while length:
            view = _read_tar(lambda: reader.read_some(length), "in", member)
            if not view:
                raise ImageError(f"corrupt tar in member '{_shown(member.name)}': unexpected end of data")
            _write_all(fd, view)
            self.stats.bytes += len(view)
            length -= len(view)

    def _symlink(self, parts: list[bytes], target: str, meta: _Meta) -> None:
        raw_target = os.fsencode(target)
        name = parts[-1]
        self._create(parts, lambda parent: os.symlink(raw_target, name, dir_fd=parent))
        parent = self._parent_fd(parts)
        if not self.rootless:
            try:
                os.chown(name, meta.uid, meta.gid, dir_fd=parent, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in CANNOT_CHOWN:
                    raise
                # A symlink cannot carry the override xattr; it keeps this process's owner.
        self._set_xattrs(fd_path(parent, name), meta.xattrs, special=True)
        if meta.mtime_ns is not None:
            os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _hardlink(self, parts: list[bytes], target: list[bytes]) -> None:
        """A link to an earlier non-directory entry, which the rules have checked is there."""
        if target == parts:
            return                 # a link to itself: already what the member asks for
        # Resolving the link's own parent may evict the target's from the cache.
        target_dir = os.dup(self._parent_fd(target, create=False))
        try:
            self._create(parts, lambda parent: os.link(target[-1], parts[-1], src_dir_fd=target_dir,
                                                       dst_dir_fd=parent, follow_symlinks=False))
        except FileNotFoundError:  # replacing the link's path removed the target with it
            raise _Hostile(f"hardlink to '{_shown(os.fsdecode(b'/'.join(target)))}' "
                           "which is not in this layer (or not yet seen)") from None
        finally:
            os.close(target_dir)

    def _special(self, parts: list[bytes], member: tarfile.TarInfo, meta: _Meta) -> None:
        """A device or fifo: made for real where allowed, else an empty file with its type in the xattr.

        user.* xattrs are refused on device and fifo inodes, so without the
        privilege to give the node its owner even a fifo becomes a stand-in.
        """
        file_type = SPECIAL_TYPES[member.type]
        device = None if file_type == stat.S_IFIFO else (member.devmajor, member.devminor)
        if not self.rootless and self._make_node(parts, file_type, device, meta):
            return
        self._regular(parts, meta, lambda fd: None, file_type, device)

    def _make_node(self, parts: list[bytes], file_type: int, device: tuple[int, int] | None, meta: _Meta) -> bool:
        """mknod as the tar says; False when this process may not make it or give it its owner."""
        name = parts[-1]
        rdev = os.makedev(*device) if device else 0
        try:
            self._create(parts, lambda parent: os.mknod(name, file_type | 0o600, rdev, dir_fd=parent))
        except PermissionError:
            return False           # no CAP_MKNOD (a user namespace)
        parent = self._parent_fd(parts)
        try:
            os.chown(name, meta.uid, meta.gid, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in CANNOT_CHOWN:
                raise
            os.unlink(name, dir_fd=parent)
            return False
        os.chmod(name, meta.mode, dir_fd=parent, follow_symlinks=False)
        self._set_xattrs(fd_path(parent, name), meta.xattrs, special=True)
        if meta.mtime_ns is not None:
            os.utime(name, ns=(meta.mtime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False)
        return True

    # ---- metadata ----------------------------------------------------------
    def _apply_to_fd(self, fd: int, meta: _Meta, file_type: int, device: tuple[int, int] | None = None) -> None:
        """Owner, mode, xattrs and mtime of a file or directory, in the order that keeps each.

        chown clears setuid bits and security.capability, so it goes first.
        Without the owner applied, the real inode gets only plain permission
        bits (at least u+rw, u+rwx for directories, so this user can serve it)
        and the override xattr tells the overlay the rest; a stand-in for a
        device or fifo is always a private empty file described by the xattr.
        """
        stand_in = file_type not in (stat.S_IFREG, stat.S_IFDIR)
        override = self.rootless or stand_in
        if not override:
            try:
                os.chown(fd, meta.uid, meta.gid)
            except OSError as exc:
                if exc.errno not in CANNOT_CHOWN:
                    raise
                override = True
        if stand_in:
            os.chmod(fd, 0o600)
        elif override:
            os.chmod(fd, (meta.mode & 0o777) | (0o700 if file_type == stat.S_IFDIR else 0o600))
        else:
            os.chmod(fd, meta.mode)
        self._set_xattrs(fd, meta.xattrs)
        if override:
            os.setxattr(fd, OVERRIDE_XATTR, Override(meta.uid, meta.gid, file_type | meta.mode, device).encode())
            self.stats.overrides = True
        if meta.mtime_ns is not None:
            os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))

    def _set_xattrs(self, target: int | bytes, xattrs: dict[str, bytes], *, special: bool = False) -> None:
        """Set a member's xattrs on an fd or a /proc path (never followed).

        Our own bookkeeping names are dropped, or an image could forge what
        the override xattr says. Without privilege only user.* can be set, and
        the kernel allows user.* only on regular files and directories, never
        on ``special`` inodes (symlinks, devices, fifos).
        """
        for name, value in xattrs.items():
            if os.fsencode(name).startswith(HIDDEN_XATTR_PREFIXES):
                continue
            if (self.rootless and not name.startswith("user.")) or (special and name.startswith("user.")):
                continue
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.EOPNOTSUPP:
                    continue       # the store's filesystem has no such namespace
                if exc.errno in (errno.ENOSPC, errno.E2BIG, errno.ERANGE) and _space_left(target):
                    raise _Unusable("its xattrs do not fit in one inode of the store's filesystem") from None
                if exc.errno in STORE_ERRNOS:
                    raise
                raise _Unusable(f"cannot set xattr '{_shown(name)}': {exc.strerror}") from None

    def finish(self) -> None:
        """Apply directory metadata, deepest first, now that nothing more is created in them."""
        for path in sorted(self.pending_dirs, key=lambda path: path.count(b"/") + bool(path), reverse=True):
            meta = self.pending_dirs[path]
            with _blame(meta.name):
                fd = self._dir_fd(path.split(b"/") if path else [], create=False)
                self._apply_to_fd(fd, meta, stat.S_IFDIR)

    # ---- paths -------------------------------------------------------------
    def _create(self, parts: list[bytes], make: Callable[[int], object]):
        """Run ``make(parent_fd)``; if the name exists, remove what is there (last member wins) and retry."""
        try:
            result = make(self._parent_fd(parts))
        except FileExistsError:
            self._remove(parts)
            result = make(self._parent_fd(parts))
        return result

    def _parent_fd(self, parts: list[bytes], *, create: bool = True) -> int:
        return self._dir_fd(parts[:-1], create=create)

    def _dir_fd(self, parts: list[bytes], *, create: bool) -> int:
        """An fd of the directory ``parts`` below the root, walked without following any symlink.

        Missing directories are made (0755, as tar does) when ``create``. The
        fd belongs to the cache: use it before resolving another path.
        """
        fd, depth = self.root_fd, len(parts)
        while depth:
            key = b"/".join(parts[:depth])
            if key in self.dir_fds:
                self.dir_fds.move_to_end(key)
                fd = self.dir_fds[key]
                break
            depth -= 1
        for index in range(depth, len(parts)):
            fd = self._open_child(fd, parts[:index + 1], create)
        return fd

    def _open_child(self, parent: int, parts: list[bytes], create: bool) -> int:
        name, path = parts[-1], b"/".join(parts)
        try:
            child = os.open(name, DIR_OPEN_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o700, dir_fd=parent)
            self.pending_dirs[path] = _Meta(os.fsdecode(path), 0, 0, 0o755, None)
            child = os.open(name, DIR_OPEN_FLAGS, dir_fd=parent)
        except OSError as exc:     # O_NOFOLLOW|O_DIRECTORY on a symlink: ENOTDIR, or ELOOP on some kernels
            if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                raise
            shown = _shown(os.fsdecode(path))
            if stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                raise _Hostile(f"parent '{shown}' is a symlink") from None
            raise _Hostile(f"parent '{shown}' is not a directory") from None
        self.dir_fds[path] = child
        if len(self.dir_fds) > DIR_CACHE_SIZE:
            os.close(self.dir_fds.popitem(last=False)[1])
        return child

    def _remove(self, parts: list[bytes]) -> None:
        """Remove whatever is at ``parts``, a whole directory tree included, following no symlink."""
        try:
            os.unlink(parts[-1], dir_fd=self._parent_fd(parts))
            self._forget(parts)
        except IsADirectoryError:
            self._remove_tree(parts)

    def _remove_tree(self, top: list[bytes]) -> None:
        """rm -rf by fds, forgetting all it removes.

        One fd at a time, climbing back through '..' (only this process
        changes the layer directory), so a tree 2000 levels deep costs
        neither 2000 fds nor a walk from the root per level.
        """
        path = list(top)
        fd = os.open(top[-1], DIR_OPEN_FLAGS, dir_fd=self._parent_fd(top, create=False))
        subdirs_left: list[list[bytes]] = []    # per level below top: subdirectories still to remove
        try:
            while True:
                subdirs = []
                with os.scandir(fd) as entries:
                    for entry in entries:
                        name = os.fsencode(entry.name)
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(name)
                        else:
                            os.unlink(name, dir_fd=fd)
                            self._forget(path + [name])
                subdirs_left.append(subdirs)
                while not subdirs_left[-1] and len(subdirs_left) > 1:
                    subdirs_left.pop()
                    self._forget(path)
                    parent = os.open(b"..", DIR_OPEN_FLAGS, dir_fd=fd)
                    os.close(fd)
                    fd = parent
                    os.rmdir(path.pop(), dir_fd=fd)
                if not subdirs_left[-1]:
                    break              # only the top is left, and it is empty
                name = subdirs_left[-1].pop()
                child = os.open(name, DIR_OPEN_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
                path.append(name)
        finally:
            os.close(fd)
        self._forget(top)
        os.rmdir(top[-1], dir_fd=self._parent_fd(top, create=False))

    def _forget(self, parts: list[bytes]) -> None:
        """Drop a removed entry from every record of what exists."""
        path = b"/".join(parts)
        if (cached := self.dir_fds.pop(path, None)) is not None:
            os.close(cached)
        self.pending_dirs.pop(path, None)


def _umask_if_creation_is_plain(root_fd: int, gid: int) -> int | None:
    """The umask, if a file created below the layer root gets our owner and exactly its mode minus it.

    That holds unless the root passes on another group (a setgid directory, or
    BSD group semantics) or a default ACL (which overrides the umask): every
    directory below it is made by this unpack and gets its own metadata only
    at the end. None (so chown and chmod as before) when unsure.
    """
    try:
        if os.fstat(root_fd).st_gid != gid:
            return None
        os.getxattr(root_fd, "system.posix_acl_default")
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENODATA, errno.EOPNOTSUPP):
            return None
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    written = os.write(fd, data)
    if written < len(data):    # a short write: only near a full disk or a signal
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]
