"""The hostile-tar corpus: no layer member may create or change anything outside its layer directory.

Two levels. Unit: ``extract_layer`` on crafted tars (tarfile where it can
write them, raw 512-byte headers where it cannot), each run between two
snapshots of everything beside the layer directory and of /etc. End to end:
the same layers through ``layermount unpack`` and ``layermount IMAGE MNT``:
exit code 3, one stderr line naming image, layer and member, and a store with
no trace of the bad layer.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import example, given, settings, strategies as st

from conftest import run_layermount
from unionfs.errors import ImageError, UnsafeArchive
from unionfs.extract import _StrictTarInfo, extract_layer
from unionfs.image.compression import open_decompressed
from unionfs.image.writer import new_config, write_image
from unionfs.mount import is_mounted

OVERRIDE = "user.containers.override_stat"
MTIME = 1_500_000_000
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


# ---- the layer directory and what must not change beside it ----------------------------
def snapshot_tree(top: Path, skip: Path | None = None) -> dict:
    """Type, mode, owner, size, mtime, links, xattrs and content of everything below ``top``."""
    seen = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [name for name in dirnames if Path(dirpath, name) != skip]
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else st.st_rdev
            seen[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, st.st_nlink, content,
                               sorted(os.listxattr(path, follow_symlinks=False)))
    return seen


def snapshot_etc() -> tuple:
    """The host's /etc as far as a member aimed at it could change it (listing, passwd, shadow)."""
    etc = os.lstat("/etc")
    files = {}
    for name in ("passwd", "shadow", "group"):
        path = Path("/etc", name)
        if path.exists():
            st = os.lstat(path)
            content = path.read_bytes() if os.access(path, os.R_OK) else None
            files[name] = (content, st.st_mode, st.st_nlink, st.st_mtime_ns, st.st_ino)
    return sorted(os.listdir("/etc")), etc.st_mtime_ns, etc.st_nlink, files


class Site:
    """An empty layer directory beside a sentinel tree that members aim at."""

    def __init__(self, root: Path):
        self.root = root
        self.dest = root / "layer"
        self.outside = root / "outside"
        self.dest.mkdir(parents=True)
        (self.outside / "sub").mkdir(parents=True)
        (self.outside / "secret").write_bytes(b"do not touch")
        os.symlink("secret", self.outside / "link")

    def snapshot(self) -> tuple:
        return snapshot_tree(self.root, skip=self.dest), snapshot_etc()


def emptied(site: Site) -> None:
    """Remove what an unpack made, keeping dest itself (the snapshot would see a new dest)."""
    for entry in site.dest.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@pytest.fixture
def site(tmp_path) -> Site:
    return Site(tmp_path / "site")


def unpack(site: Site, data: bytes | io.RawIOBase, **options):
    """extract_layer into site.dest; whatever it does, nothing beside dest nor in /etc may change."""
    before = site.snapshot()
    try:
        return extract_layer(io.BytesIO(data) if isinstance(data, bytes) else data, site.dest, **options)
    finally:
        assert site.snapshot() == before, "a member changed something outside the layer directory"


def refused(site: Site, data, member: str, *, shown: str | None = None, kind=UnsafeArchive, words: str = "",
            **options):
    """The tar must fail with ``kind``: one line that names ``member`` (as ``shown``) and says ``words``.

    Names over 120 characters are shown by their first 60 and last 40.
    """
    with pytest.raises(kind) as caught:
        unpack(site, data, **options)
    message = str(caught.value)
    assert type(caught.value) is kind, f"{type(caught.value).__name__}: {message}"
    assert "\n" not in message and message
    shown = shown or member
    if len(shown) <= 120:
        assert f"member '{shown}'" in message, message
    else:
        assert f"member '{shown[:60]}...{shown[-40:]}'" in message, message
    assert words in message, message
    if kind is UnsafeArchive:
        assert caught.value.member == member
    return caught.value


# ---- building tars ----------------------------------------------------------------------------
def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", pax: dict | None = None, **attrs):
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, len(data), MTIME
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    if pax:
        info.pax_headers = dict(pax)
    return info, data


def reg(name, data=b"", **attrs):
    return member(name, tarfile.REGTYPE, data, **attrs)


def dir_(name, **attrs):
    return member(name, tarfile.DIRTYPE, **attrs)


def sym(name, target, **attrs):
    return member(name, tarfile.SYMTYPE, linkname=target, **attrs)


def hard(name, target, **attrs):
    return member(name, tarfile.LNKTYPE, linkname=target, **attrs)


def tar_of(*members, format=tarfile.PAX_FORMAT, pax_headers=None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=format, pax_headers=pax_headers) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def raw_header(name: bytes, typeflag: bytes = b"0", size: int | bytes = 0, linkname: bytes = b"") -> bytearray:
    """A 512-byte GNU header, checksum not yet set; ``size`` may be the raw 12-byte field."""
    header = bytearray(512)
    header[0:len(name)] = name
    header[100:108] = octal(0o644, 8)
    header[108:116] = octal(0, 8)
    header[116:124] = octal(0, 8)
    header[124:136] = size if isinstance(size, bytes) else octal(size, 12)
    header[136:148] = octal(MTIME, 12)
    header[156:157] = typeflag
    header[157:157 + len(linkname)] = linkname
    header[257:265] = b"ustar  \0"
    return header


def sealed(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


END = bytes(1024)


def gnu_long(kind: bytes, value: bytes) -> bytes:
    """A GNU 'L' (long name) or 'K' (long link target) record for the header after it."""
    return sealed(raw_header(b"././@LongLink", kind, len(value))) + padded(value)


def gnu_sparse(name: bytes, real_size: int, segments: list[tuple[int, bytes]]) -> bytes:
    """An old-GNU 'S' member with its map in the header (tarfile reads these but cannot write them)."""
    stored = b"".join(chunk for _, chunk in segments)
    header = raw_header(name, b"S", len(stored))
    for index, (offset, chunk) in enumerate(segments):
        header[386 + 24 * index:398 + 24 * index] = octal(offset, 12)
        header[398 + 24 * index:410 + 24 * index] = octal(len(chunk), 12)
    header[483:495] = octal(real_size, 12)
    return sealed(header) + padded(stored)


# ---- 1. unit level: names -----------------------------------------------------------------------
DOTDOT_CASES = {
    "plain": ("../escaped", lambda: tar_of(reg("ok", b"1"), reg("../escaped", b"x"))),
    "aimed at the sentinel": ("../outside/secret", lambda: tar_of(reg("../outside/secret", b"x"))),
    "inner": ("a/b/../../../outside/new", lambda: tar_of(reg("a/b/../../../outside/new", b"x"))),
    "absolute then up": ("/../outside/new", lambda: tar_of(reg("/../outside/new", b"x"))),
    "directory": ("../outside/newdir", lambda: tar_of(dir_("../outside/newdir"))),
    "symlink": ("../outside/sl", lambda: tar_of(sym("../outside/sl", "/etc"))),
    "gnu long name": ("../" * 40 + "outside/new",
                      lambda: gnu_long(b"L", b"../" * 40 + b"outside/new\0") + sealed(raw_header(b"short")) + END),
    "pax path over a harmless name": ("../outside/new",
                                      lambda: tar_of(reg("harmless", b"x", pax={"path": "../outside/new"}))),
    "pax global path": ("../outside/new",
                        lambda: tar_of(reg("harmless", b"x"), pax_headers={"path": "../outside/new"})),
    "sparse real name": ("../outside/new", lambda: tar_of(reg("GNUSparseFile.0/s", padded(b"1\n0\n1\n") + b"x", pax={
        "GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "../outside/new",
        "GNU.sparse.realsize": "1"}))),
}


@pytest.mark.parametrize("case", DOTDOT_CASES)
def test_dotdot_names_are_refused(site, case):
    name, build = DOTDOT_CASES[case]
    refused(site, build(), name, words="'..' component")
    assert not (site.root / "escaped").exists() and not (site.outside / "new").exists()


def test_absolute_names_are_stripped_and_land_inside(site):
    unpack(site, tar_of(reg("/etc/passwd", b"layer passwd"), reg("//twice/x", b"2"), dir_("/abs/dir/"),
                        sym("/abs/link", "/etc/shadow"), reg("/./dots/./f", b"d")))
    assert (site.dest / "etc/passwd").read_bytes() == b"layer passwd"
    assert (site.dest / "twice/x").read_bytes() == b"2"
    assert (site.dest / "abs/dir").is_dir() and (site.dest / "dots/f").read_bytes() == b"d"
    assert os.readlink(site.dest / "abs/link") == "/etc/shadow"


def test_a_nul_in_a_name_or_a_link_target_is_refused(site):
    refused(site, tar_of(reg("plain", b"x", pax={"path": "etc\0/../../x"})), "etc\0/../../x",
            shown="etc\\x00/../../x", words="NUL")
    refused(site, tar_of(sym("s", "x", pax={"linkpath": "/etc\0passwd"})), "s", words="NUL")
    refused(site, tar_of(reg("f"), hard("h", "f", pax={"linkpath": "f\0../../outside/secret"})), "h", words="NUL")
    refused(site, tar_of(reg("f", pax={"SCHILY.xattr.user.a\0b": "v"})), "f", kind=ImageError, words="xattr name")


def test_a_nul_in_a_plain_header_name_ends_the_name_as_in_c(site):
    unpack(site, sealed(raw_header(b"inside\0/../../outside/new")) + END)
    assert os.listdir(site.dest) == ["inside"]


def test_names_over_path_max_or_name_max_are_refused_and_path_max_itself_works(site):
    limit = "/".join(["d" * 255] * 16)                         # PATH_MAX - 1 bytes (the kernel counts the NUL)
    assert len(limit) == 4095
    unpack(site, tar_of(reg(limit, b"at the limit")))
    half = "/".join(limit.split("/")[:8])
    fd = os.open(site.dest / half, os.O_RDONLY | os.O_DIRECTORY)   # the whole path is too long to open at once
    try:
        with open(limit[len(half) + 1:], "rb", opener=lambda path, flags: os.open(path, flags, dir_fd=fd)) as leaf:
            assert leaf.read() == b"at the limit"
    finally:
        os.close(fd)
    too_long = limit + "x"
    refused(site, tar_of(reg(too_long, b"x")), too_long, words="PATH_MAX")
    refused(site, tar_of(reg("f"), hard("h", "a/" * 2100)), "h", words="PATH_MAX")
    refused(site, tar_of(reg("d/" + "n" * 256, b"x")), "d/" + "n" * 256, words="NAME_MAX")
    refused(site, tar_of(sym("s", "t" * 5000)), "s", kind=ImageError, words="File name too long")


def test_message_escapes_control_characters_in_names(site):
    error = refused(site, tar_of(reg("../new\nline\x1b[2J", b"x")), "../new\nline\x1b[2J",
                    shown="../new\\nline\\x1b[2J")
    assert "\x1b" not in str(error)


# ---- symlinks ------------------------------------------------------------------------------------
WRITES_BELOW = {
    "file": lambda name: reg(name, b"pwned"),
    "directory": lambda name: dir_(name),
    "symlink": lambda name: sym(name, "/bin/sh"),
    "fifo": lambda name: member(name, tarfile.FIFOTYPE),
    "device": lambda name: member(name, tarfile.CHRTYPE, devmajor=1, devminor=3),
    "hardlink": lambda name: hard(name, "ok"),
}


@pytest.mark.parametrize("what", WRITES_BELOW)
@pytest.mark.parametrize("target", ["/etc", "OUTSIDE", "..", "../outside"])
def test_nothing_is_written_through_a_symlink_member(site, target, what):
    target = str(site.outside) if target == "OUTSIDE" else target
    data = tar_of(reg("ok", b"1"), sym("a", target), WRITES_BELOW[what]("a/passwd"))
    refused(site, data, "a/passwd", words="parent 'a' is a symlink", rootless=what == "device")
    assert os.readlink(site.dest / "a") == target                   # the link itself is kept, as written


def test_chains_of_symlinks_to_dotdot_lead_nowhere(site):
    chain = [sym("a", "."), sym("b", "a/.."), sym("c", "b/../.."), sym("d", "c/c/c/..")]
    unpack(site, tar_of(*chain))                                    # making them is harmless
    assert [os.readlink(site.dest / name) for name in "abcd"] == [".", "a/..", "b/../..", "c/c/c/.."]
    for name in ("d/outside/secret", "c/x", "b/b/x", "a/a/a/x"):
        parent = name.split("/")[0]
        refused(site, tar_of(*chain, reg(name, b"x")), name, words=f"parent '{parent}' is a symlink")
        emptied(site)


def test_a_directory_replaced_by_a_symlink_cannot_be_written_below(site):
    # The replaced directories were open (cached) while their children were made.
    outside = str(site.outside)
    for replace in (sym("d", outside), hard("d", "s")):       # a symlink member, or a hardlink to one
        emptied(site)
        data = tar_of(sym("s", outside), dir_("d"), dir_("d/sub"), reg("d/sub/f", b"1"), replace,
                      reg("d/sub/secret", b"overwritten"))
        refused(site, data, "d/sub/secret", words="parent 'd' is a symlink")
        assert os.readlink(site.dest / "d") == outside


def test_the_layer_root_cannot_be_replaced(site):
    refused(site, tar_of(sym(".", str(site.outside)), reg("secret", b"x")), ".", words="layer root")
    refused(site, tar_of(reg("./", b"x")), "./", words="layer root")
    refused(site, tar_of(reg("f"), hard("/", "f")), "/", words="layer root")


# ---- hardlinks ------------------------------------------------------------------------------------
HARDLINK_ESCAPES = {            # case: (link target, members before the link, words of the error); o: the sentinel
    "absolute path of a host file": (lambda o: "/etc/passwd", lambda o: [], "not in this layer"),
    "sentinel by absolute path": (lambda o: f"{o}/secret", lambda o: [], "not in this layer"),
    "dotdot": (lambda o: "../outside/secret", lambda o: [], "'..' component"),
    "not yet seen": (lambda o: "later", lambda o: [], "not in this layer (or not yet seen)"),
    "through a symlink to /etc": (lambda o: "s/passwd", lambda o: [sym("s", "/etc")], "not in this layer"),
    "through a symlink to dotdot": (lambda o: "up/outside/secret", lambda o: [sym("up", "..")], "not in this layer"),
    "below a directory now a symlink": (lambda o: "d/f", lambda o: [reg("d/f", b"1"), sym("d", o)],
                                        "not in this layer"),
    "a directory": (lambda o: "d", lambda o: [dir_("d")], "hardlink to directory"),
}


@pytest.mark.parametrize("case", HARDLINK_ESCAPES)
def test_hardlinks_out_of_the_layer_are_refused(site, case):
    target, before, words = HARDLINK_ESCAPES[case]
    outside = str(site.outside)
    refused(site, tar_of(*before(outside), hard("h", target(outside)), reg("later", b"x")), "h", words=words)
    assert os.lstat(site.outside / "secret").st_nlink == 1


def test_a_hardlink_to_a_symlink_pointing_outside_links_the_symlink(site):
    unpack(site, tar_of(sym("s", str(site.outside / "secret")), hard("h", "s"), sym("sd", str(site.outside)),
                        hard("hd", "sd")))
    assert os.lstat(site.dest / "h").st_ino == os.lstat(site.dest / "s").st_ino
    assert os.readlink(site.dest / "h") == str(site.outside / "secret")
    refused(site, tar_of(sym("sd", str(site.outside)), hard("hd", "sd"), reg("hd/secret", b"x")), "hd/secret",
            words="parent 'hd' is a symlink")


def test_a_hardlink_to_the_absolute_name_of_a_layer_member_links_inside(site):
    unpack(site, tar_of(reg("etc/passwd", b"layer"), hard("h", "/etc/passwd"), hard("/abs", "./etc//passwd")))
    inode = os.stat(site.dest / "etc/passwd").st_ino
    assert os.stat(site.dest / "h").st_ino == os.stat(site.dest / "abs").st_ino == inode
    assert os.stat(site.dest / "etc/passwd").st_nlink == 3


# ---- devices, whiteouts --------------------------------------------------------------------------
DEVICES = [member("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
           member("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=8, devminor=0),
           member("dev/kmsg", tarfile.CHRTYPE, mode=0o4644, uid=3, devmajor=1, devminor=11),
           member("run/fifo", tarfile.FIFOTYPE, mode=0o620, uid=7, gid=8)]
STAND_INS = {"dev/null": b"0:0:020666:1:3", "dev/sda": b"0:6:060660:8:0", "dev/kmsg": b"3:0:024644:1:11",
             "run/fifo": b"7:8:010620"}


def assert_stand_ins(dest: Path) -> None:
    for name, value in STAND_INS.items():
        st = os.lstat(dest / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size == 0 and not st.st_mode & 0o7077, name
        assert os.getxattr(dest / name, OVERRIDE) == value, name


def test_devices_with_rootless_are_empty_files_described_by_the_override(site):
    stats = unpack(site, tar_of(*DEVICES), rootless=True)
    assert_stand_ins(site.dest)
    assert stats.overrides


@needs_root
def test_devices_unpacked_by_a_real_unprivileged_user_are_stand_ins(site):
    """A forked child as nobody, rootless detected from its euid: mknod would fail, the tar must not."""
    good, hostile = tar_of(*DEVICES), tar_of(*DEVICES, reg("dev/../../outside/new"))
    os.chown(site.dest, NOBODY, NOBODY)
    before = site.snapshot()
    for tar_bytes, expected in ((good, "ok"), (hostile, "UnsafeArchive")):
        emptied(site)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:                                            # pragma: no cover - the child
            outcome = "ok"
            try:
                os.close(read_end)
                os.chdir(site.dest)                             # dest is reached as root; nobody cannot walk tmp
                os.setgroups([])
                os.setresgid(NOBODY, NOBODY, NOBODY)
                os.setresuid(NOBODY, NOBODY, NOBODY)
                extract_layer(io.BytesIO(tar_bytes), ".")
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                outcome = f"{type(exc).__name__}: {exc}"
            finally:
                os.write(write_end, outcome.encode()[:4000])
                os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            outcome = pipe.read().decode()
        os.waitpid(pid, 0)
        assert outcome.split(":")[0] == expected, outcome
        if expected == "ok":
            assert_stand_ins(site.dest)
            assert os.lstat(site.dest / "dev/null").st_uid == NOBODY
        else:
            assert "member 'dev/../../outside/new'" in outcome
    assert site.snapshot() == before


@pytest.mark.parametrize("name, words", [(".wh..", "whiteout of '.'"), ("d/.wh...", "whiteout of '..'"),
                                         ("../.wh.outside", "'..' component"),
                                         ("/../outside/.wh.secret", "'..' component")])
def test_whiteouts_of_dot_dotdot_or_outside_are_refused(site, name, words):
    refused(site, tar_of(dir_("d"), reg(name)), name, words=words)


def test_whiteouts_inside_are_kept_as_markers(site):
    unpack(site, tar_of(reg(".wh.etc"), reg("/abs/.wh.passwd"), dir_("d"), reg("d/.wh..wh..opq")))
    for marker in (".wh.etc", "abs/.wh.passwd", "d/.wh..wh..opq"):
        assert (site.dest / marker).is_file()


# ---- damaged tars and streams ---------------------------------------------------------------------
def three_members(format=tarfile.USTAR_FORMAT) -> bytes:
    return tar_of(reg("a", b"A" * 700), reg("b", b"B"), reg("c", b"C"), format=format)


def test_a_corrupt_header_checksum_is_an_image_error(site):
    data = bytearray(three_members())
    data[1536 + 5] ^= 0x20                                       # b's header: after a's header and 2 data blocks
    with pytest.raises(ImageError, match="corrupt tar at byte 1536: bad checksum") as caught:
        unpack(site, bytes(data))
    assert not isinstance(caught.value, UnsafeArchive)


@pytest.mark.parametrize("size_field, words", [
    (b"12x45\0\0\0\0\0\0\0", "corrupt tar"),                     # not octal
    (b"\xff" + (256 ** 11 - 4096).to_bytes(11, "big"), "member 'neg'"),   # base-256, negative
    (octal(1 << 33, 12), "member 'huge': unexpected end of data"),        # far beyond the stream
])
def test_impossible_sizes_are_image_errors(site, size_field, words):
    name = b"neg" if size_field.startswith(b"\xff") else b"huge"
    first = tar_of(reg("first", b"1"), format=tarfile.USTAR_FORMAT)[:1024]     # header and data, no end blocks
    with pytest.raises(ImageError, match=words) as caught:
        unpack(site, first + sealed(raw_header(name, b"0", size_field)) + END + bytes(8192))
    assert type(caught.value) is ImageError


def test_a_tar_cut_inside_a_member_or_a_header_is_an_image_error(site):
    data = three_members()
    refused(site, data[:512 + 300], "a", kind=ImageError, words="unexpected end of data")
    with pytest.raises(ImageError, match="corrupt tar"):
        unpack(site, data[:1536 + 100])


# ---- the fast header parse: whatever it gets, it answers as tarfile does ---------------------------
HEADER_SLOTS = [slot for slot in tarfile.TarInfo.__slots__ if slot != "tarfile"]
# Bytes that make number and name fields interesting: digits at the edges of octal, the marks of
# base-256, what int() and str.strip() treat differently, high-bit bytes for the signed checksum.
TRICKY_BYTES = b"0178 \0\x80\xff_+-\t\x0b\x1c\x1fo/x\xc3\xa9"


def parsed(parser, block: bytes):
    try:
        info = parser.frombuf(block, "utf-8", "surrogateescape")
    except Exception as exc:      # noqa: BLE001 -- the type and words are what must agree
        return type(exc), str(exc)
    return {slot: getattr(info, slot, None) for slot in HEADER_SLOTS}


def checksum_fixed(block: bytearray, signed: bool, layout: int) -> bytes:
    """The block with a checksum that matches it, written in one of the forms writers use."""
    block[148:156] = b" " * 8
    total = sum(byte - 256 if signed and byte >= 128 else byte for byte in block)
    field = ((b"%06o\0 ", b"%07o\0", b"%o\0", b"  %05o ")[layout] % total)[:8]
    block[148:156] = field + bytes(8 - len(field))
    return bytes(block)


NUMBER_FIELDS = [(100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (329, 8), (337, 8)]   # mode ... devminor
PATHS = st.text(alphabet="ab/\u00e9\x1c.", min_size=1, max_size=160) | st.text(min_size=1, max_size=120)


@st.composite
def number_fields(draw, width: int) -> bytes:
    """Octal-ish text with the edges where parsers differ: odd whitespace, signs, '_', '0o', no NUL."""
    blanks = st.text(alphabet=" \t\x0b\x1c\x1f", max_size=2)
    text = draw(blanks) + draw(st.text(alphabet="01234567_+-o8", max_size=width)) + draw(blanks)
    field = (text.encode() + draw(st.sampled_from([b"\0", b" ", b""])))[:width]
    return field + bytes(width - len(field)) if draw(st.booleans()) else field.ljust(width, b" ")


@st.composite
def header_blocks(draw):
    info = tarfile.TarInfo(draw(PATHS))
    info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE,
                                      tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE, tarfile.CONTTYPE,
                                      tarfile.GNUTYPE_SPARSE, b"Z"]))
    info.linkname = draw(st.text(max_size=110))
    info.size = draw(st.integers(0, 1 << 40))
    info.mtime = draw(st.integers(0, 1 << 40))
    info.uid, info.gid = draw(st.integers(0, 1 << 30)), draw(st.integers(0, 1 << 30))
    info.mode = draw(st.integers(0, 0o7777))
    info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 4095))
    format = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    try:
        block = bytearray(info.tobuf(format, "utf-8", "surrogateescape")[-512:])   # the member's own header
    except ValueError:
        block = bytearray(512)
    for position, byte in draw(st.lists(st.tuples(st.integers(0, 511), st.sampled_from(TRICKY_BYTES)),
                                        max_size=12)):
        block[position] = byte
    for start, width in draw(st.lists(st.sampled_from(NUMBER_FIELDS), max_size=1)):   # a whole field rewritten
        block[start:start + width] = draw(number_fields(width))
    if draw(st.booleans()):
        prefix = draw(PATHS).encode("utf-8", "surrogateescape")[:155]
        block[345:345 + len(prefix)] = prefix
    if draw(st.integers(0, 9)):
        return checksum_fixed(block, draw(st.booleans()), draw(st.integers(0, 3)))
    return bytes(block)


def edited_header(name: bytes = b"f", kind: bytes = b"0", **fields: bytes) -> bytes:
    """A valid header with some fields (by offset name) replaced, checksum fixed."""
    block = raw_header(name, kind)
    for offset, value in fields.items():
        start = int(offset[1:])
        block[start:start + len(value)] = value
    return checksum_fixed(block, False, 0)


@settings(max_examples=800, deadline=None)
@given(block=header_blocks())
@example(block=edited_header(b"v7dir/", b"\0"))                       # the old form of a directory
@example(block=edited_header(b"name", _345=b"pre/fix"))                  # a ustar prefix
@example(block=edited_header(b"name", b"L", _345=b"pre/fix"))            # ... ignored for GNU types
@example(block=edited_header(_124=b"18\0"))                              # not octal
@example(block=edited_header(_124=b"\x1c17\x1c\0"))                      # str.strip() takes \x1c, int() not
@example(block=edited_header(_124=b"+0o17_1\0"))                         # what int() also accepts
@example(block=edited_header(_124=b"        \0"))                        # blank: 0 to tarfile
@example(block=edited_header(_108=b"\xff" + bytes(6) + b"\1"))           # base-256, negative
def test_the_fast_header_parse_answers_as_tarfile_does(block):
    """A parser of its own may read a header otherwise than tarfile (and lint) do: a member
    shown as one thing and unpacked as another. Any block, valid or damaged, must give the same
    fields or the same error."""
    assert parsed(_StrictTarInfo, block) == parsed(tarfile.TarInfo, block)


@pytest.mark.parametrize("block", [b"", bytes(100), bytes(512), bytes(511) + b"\1", b"\xff" * 512])
def test_short_empty_and_junk_header_blocks_answer_as_tarfile_does(block):
    assert parsed(_StrictTarInfo, block) == parsed(tarfile.TarInfo, block)


def test_a_header_with_a_signed_checksum_or_base256_numbers_unpacks_as_tarfile_reads_it(site):
    """Old Sun tars sum header bytes as signed chars; GNU tar writes big numbers in base-256.
    Neither is the fast parse's form, and both must still unpack (and not be taken for the end)."""
    signed = raw_header("caf\u00e9".encode(), size=3)
    signed[148:156] = b" " * 8
    signed[148:156] = b"%06o\0 " % sum(byte - 256 if byte >= 128 else byte for byte in signed)
    big_uid = raw_header(b"owned", size=2)
    big_uid[108:116] = b"\x80" + (1234).to_bytes(7, "big")
    unpack(site, bytes(signed) + padded(b"abc") + sealed(big_uid) + padded(b"de") + END)
    assert (site.dest / "caf\u00e9").read_bytes() == b"abc"
    assert (site.dest / "owned").read_bytes() == b"de"


def test_a_huge_base256_size_is_an_image_error_naming_the_member(site):
    first = tar_of(reg("first", b"1"), format=tarfile.USTAR_FORMAT)[:1024]
    huge = raw_header(b"huge", b"0", b"\x80" + (1 << 62).to_bytes(11, "big"))
    refused(site, first + sealed(huge) + END + bytes(8192), "huge", kind=ImageError,
            words="unexpected end of data")


def test_a_corrupt_sparse_map_is_an_image_error(site):
    overlapping = gnu_sparse(b"s", 100, [(10, b"abcdef"), (12, b"x")])
    refused(site, overlapping + END, "s", kind=ImageError, words="corrupt sparse map")
    beyond = gnu_sparse(b"t", 8, [(4, b"abcdefgh")])
    refused(site, beyond + END, "t", kind=ImageError, words="corrupt sparse map")


def compressed(kind: str, data: bytes) -> bytes:
    """As the writers of images do; zstd with the optional checksum, so a cut can spare all the data."""
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    return zstandard.ZstdCompressor(write_checksum=True).compress(data)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_compressed_streams_are_image_errors(site, kind):
    data = tar_of(reg("small", b"s"), reg("big", os.urandom(200_000)), reg("after", b"a"))
    blob = compressed(kind, data)
    with pytest.raises(ImageError, match=f"truncated {kind} stream"):
        unpack(site, open_decompressed(io.BytesIO(blob[:len(blob) // 2])))
    emptied(site)
    stream = open_decompressed(io.BytesIO(blob[:-3]))          # the tar is whole; the stream's end is not
    unpack(site, stream)
    assert (site.dest / "after").read_bytes() == b"a"
    with pytest.raises(ImageError, match=f"truncated {kind} stream"):
        stream.read()                                          # what the store's drain does, before publishing


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compressed_stream_cut_inside_a_member_names_the_member(site, kind):
    blob = compressed(kind, tar_of(reg("small", b"s"), reg("big", os.urandom(200_000)), reg("after", b"a")))
    refused(site, open_decompressed(io.BytesIO(blob[:len(blob) // 2])), "big", kind=ImageError,
            words=f"truncated {kind} stream")


def test_xattrs_that_do_not_fit_the_inode_are_an_image_error_naming_the_member(site, tmp_path):
    xattrs = {f"user.k{index}": "v" * 200 for index in range(40)}
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    try:
        for name, value in xattrs.items():
            os.setxattr(probe, name, value.encode())
        pytest.skip("this filesystem holds 8 KiB of xattrs in one inode")
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            pytest.skip(f"setxattr fails otherwise here: {exc}")
    refused(site, tar_of(reg("many", pax={"SCHILY.xattr." + name: value for name, value in xattrs.items()})),
            "many", kind=ImageError)


# ---- valid tars that must work ---------------------------------------------------------------------
@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_long_link_targets(site, format):
    deep = "/".join(["p" * 250] * 4) + "/f"                      # 1000+ bytes: ustar holds 255
    target = "../" + "/".join(["t" * 200] * 6)                   # 1200 bytes, dangling
    data = tar_of(reg(deep, b"deep"), sym("s" * 120, target), hard("h" * 130, deep), hard("h2", "/" + deep),
                  format=format)
    assert (b"././@LongLink" in data) == (format == tarfile.GNU_FORMAT)
    unpack(site, data)
    assert (site.dest / deep).read_bytes() == b"deep"
    assert os.readlink(site.dest / ("s" * 120)) == target
    inodes = {os.stat(site.dest / name).st_ino for name in (deep, "h" * 130, "h2")}
    assert len(inodes) == 1


SPARSE_SEGMENTS = [(0, b"head"), (1 << 20, b"one"), (3 << 20, b"x" * 70_000), (5 << 20, b"five"), (6 << 20, b"six"),
                   (7 << 20, b"seven")]                           # more than 4: the GNU header's map overflows
SPARSE_SIZE = 9 << 20


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
@pytest.mark.parametrize("version", ["gnu", "0.0", "0.1", "1.0"])
def test_sparse_members_from_gnu_tar_read_back_right(site, tmp_path, version):
    source = tmp_path / "src"
    source.mkdir()
    expected = bytearray(SPARSE_SIZE)
    with open(source / "sparse", "wb") as sparse:
        for offset, chunk in SPARSE_SEGMENTS:
            sparse.seek(offset)
            sparse.write(chunk)
            expected[offset:offset + len(chunk)] = chunk
        sparse.truncate(SPARSE_SIZE)
    (source / "after").write_bytes(b"ok")
    options = ["--format=gnu"] if version == "gnu" else ["--format=pax", f"--sparse-version={version}"]
    data = subprocess.run(["tar", "--sparse", *options, "-cf", "-", "-C", source, "sparse", "after"], check=True,
                          capture_output=True).stdout
    assert len(data) < SPARSE_SIZE // 8                           # tar did store it sparse
    unpack(site, data)
    assert (site.dest / "sparse").read_bytes() == expected
    assert (site.dest / "sparse").stat().st_blocks * 512 < SPARSE_SIZE // 8   # holes stay holes
    assert (site.dest / "after").read_bytes() == b"ok"


def test_crafted_gnu_sparse_member_with_a_trailing_hole(site):
    unpack(site, gnu_sparse(b"s", 10_000, [(100, b"abc"), (5000, b"def")]) + END)
    assert (site.dest / "s").read_bytes() == bytes(100) + b"abc" + bytes(4897) + b"def" + bytes(4997)


def test_duplicate_members_last_one_wins(site):
    outside = str(site.outside)
    unpack(site, tar_of(
        reg("f", b"first"), reg("f", b"second"),
        reg("kept", b"old"), hard("old-link", "kept"), reg("kept", b"new"),
        dir_("tree"), reg("tree/a", b"a"), dir_("tree/sub"), reg("tree/sub/b"), reg("tree", b"file now"),
        reg("grows", b"x"), dir_("grows", mode=0o750), reg("grows/child", b"c"),
        dir_("merged", mode=0o700), reg("merged/one", b"1"), dir_("merged", mode=0o711), reg("merged/two", b"2"),
        dir_("gone"), reg("gone/x"), sym("gone", outside),
        sym("was-link", outside), dir_("was-link"), reg("was-link/inside", b"i"),
        sym("link-then-file", "/etc/passwd"), reg("link-then-file", b"plain"),
    ))
    dest = site.dest
    assert (dest / "f").read_bytes() == b"second"
    assert (dest / "kept").read_bytes() == b"new" and (dest / "old-link").read_bytes() == b"old"
    assert (dest / "tree").read_bytes() == b"file now"
    assert (dest / "grows/child").read_bytes() == b"c"
    assert sorted(os.listdir(dest / "merged")) == ["one", "two"]
    assert stat.S_IMODE(os.stat(dest / "merged").st_mode) == 0o711           # the last one's metadata
    assert os.readlink(dest / "gone") == outside
    assert not (dest / "was-link").is_symlink() and (dest / "was-link/inside").read_bytes() == b"i"
    assert not (dest / "link-then-file").is_symlink() and (dest / "link-then-file").read_bytes() == b"plain"


def test_hardlinks_share_an_inode(site):
    stats = unpack(site, tar_of(reg("a/f", b"data"), hard("b/g", "a/f"), hard("c", "./a/f"), hard("a/f", "a/f")))
    inodes = {os.stat(site.dest / name).st_ino for name in ("a/f", "b/g", "c")}
    assert len(inodes) == 1 and os.stat(site.dest / "c").st_nlink == 3 and (site.dest / "c").read_bytes() == b"data"
    assert stats.entries == 4 and stats.bytes == 4


@needs_root
def test_devices_and_fifos_as_root_are_real(site):
    stats = unpack(site, tar_of(*DEVICES), rootless=False)
    null, sda, kmsg, fifo = (os.lstat(site.dest / name) for name in ("dev/null", "dev/sda", "dev/kmsg", "run/fifo"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0) and sda.st_gid == 6
    assert stat.S_ISCHR(kmsg.st_mode) and stat.S_IMODE(kmsg.st_mode) == 0o4644 and kmsg.st_uid == 3
    assert stat.S_ISFIFO(fifo.st_mode) and (fifo.st_uid, fifo.st_gid) == (7, 8) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert not stats.overrides and not os.listxattr(site.dest / "dev/null", follow_symlinks=False)


@needs_root
def test_metadata_as_root(site):
    binary = b"\x00\xff\xfe\x01 not utf-8 \xc3\x28"
    xattrs = {"SCHILY.xattr.user.text": "caf\u00e9", "SCHILY.xattr.user.bin": binary.decode("utf-8", "surrogateescape"),
              "SCHILY.xattr.trusted.bin": binary.decode("utf-8", "surrogateescape")}
    data = tar_of(
        dir_("tmp", mode=0o1777, mtime=1_100_000_000), reg("tmp/later", b"l"),
        dir_("usr/bin", mode=0o2755, uid=10, gid=20, mtime=1_200_000_000),
        reg("usr/bin/su", b"#!", mode=0o4755, uid=0, gid=0, mtime=1_000_000_000, pax=xattrs),
        reg("usr/bin/sg", b"#!", mode=0o2711, uid=1234, gid=5678, mtime=999),
        sym("usr/bin/sh", "su", uid=42, gid=43, mtime=1_300_000_000),
        reg("frac", pax={"mtime": "1234567890.123456789"}),
        reg("forged", pax={"SCHILY.xattr." + OVERRIDE: "0:0:0104777"}),
    )
    stats = unpack(site, data, rootless=False)
    dest = site.dest

    def info(name):
        st = os.lstat(dest / name)
        return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_mtime_ns

    assert info("tmp") == (0, 0, 0o1777, 1_100_000_000 * 10**9)      # mtime set after tmp/later was made
    assert info("usr/bin") == (10, 20, 0o2755, 1_200_000_000 * 10**9)
    assert info("usr/bin/su") == (0, 0, 0o4755, 1_000_000_000 * 10**9)
    assert info("usr/bin/sg") == (1234, 5678, 0o2711, 999 * 10**9)
    assert info("usr/bin/sh")[:2] == (42, 43) and info("usr/bin/sh")[3] == 1_300_000_000 * 10**9
    assert info("frac")[3] == 1234567890123456789
    assert os.getxattr(dest / "usr/bin/su", "user.text") == "caf\u00e9".encode()
    assert os.getxattr(dest / "usr/bin/su", "user.bin") == binary
    assert os.getxattr(dest / "usr/bin/su", "trusted.bin") == binary
    assert OVERRIDE not in os.listxattr(dest / "forged")              # an image may not forge the override
    assert not stats.overrides


@pytest.mark.parametrize("rootless", [False, True])
def test_a_read_only_directory_gets_its_children(site, rootless):
    if not rootless and os.geteuid() != 0:
        pytest.skip("needs root")
    unpack(site, tar_of(dir_("ro", mode=0o555), dir_("ro/inner", mode=0o500), reg("ro/inner/f", b"x"),
                        reg("ro/g", b"y", mode=0o444), hard("ro/h", "ro/g")), rootless=rootless)
    assert (site.dest / "ro/inner/f").read_bytes() == b"x" and (site.dest / "ro/h").read_bytes() == b"y"
    if rootless:
        assert os.getxattr(site.dest / "ro", OVERRIDE) == b"0:0:040555"
        assert os.getxattr(site.dest / "ro/inner", OVERRIDE) == b"0:0:040500"
    else:
        assert stat.S_IMODE(os.stat(site.dest / "ro").st_mode) == 0o555
        assert stat.S_IMODE(os.stat(site.dest / "ro/inner").st_mode) == 0o500


# ---- 2. end to end: the CLI and the store --------------------------------------------------------
HOSTILE_LAYERS = {                      # case: (member as the message shows it, tar given the sentinel dir)
    "dotdot": ("../escaped", lambda o: tar_of(reg("ok", b"1"), reg("../escaped", b"x"))),
    "symlink to /etc, then through it": ("a/passwd", lambda o: tar_of(reg("ok"), sym("a", "/etc"),
                                                                       reg("a/passwd", b"root::0:0::/:/bin/sh\n"))),
    "directory replaced by a symlink": ("d/secret", lambda o: tar_of(dir_("d"), reg("d/f"), sym("d", str(o)),
                                                                      reg("d/secret", b"overwritten"))),
    "hardlink to a host file": ("h", lambda o: tar_of(reg("ok"), hard("h", "/etc/shadow"))),
    "hardlink through a symlink": ("h", lambda o: tar_of(sym("s", str(o)), hard("h", "s/secret"))),
    "whiteout of dotdot": ("d/.wh...", lambda o: tar_of(dir_("d"), reg("d/.wh..."))),
    "nul in a name": ("a\\x00b", lambda o: tar_of(reg("ok"), reg("x", pax={"path": "a\0b"}))),
    "corrupt sparse map": ("s", lambda o: gnu_sparse(b"s", 100, [(10, b"abcdef"), (12, b"x")]) + END),
}
BASE = tar_of(dir_("etc"), reg("etc/os-release", b"ID=base\n"), reg("bin/sh", b"#!", mode=0o755))


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def assert_store_has_no_trace(store: Path, layers_before: list[str] | None = None) -> None:
    assert sorted(os.listdir(store / "layers")) == (layers_before or [])
    assert os.listdir(store / "tmp") == []


def unpack_fails(*args, store: Path, names: list[str]) -> str:
    result = run_layermount("unpack", *args, "--store", store, "-q")
    assert result.returncode == 3, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", HOSTILE_LAYERS)
def test_cli_refuses_a_hostile_layer_and_keeps_the_store_clean(tmp_path, case):
    name, build = HOSTILE_LAYERS[case]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not touch")
    base, evil = write(tmp_path / "base.tar", BASE), write(tmp_path / "evil.tar", build(outside))
    before = snapshot_etc(), snapshot_tree(outside)
    unpack_fails(base, evil, store=tmp_path / "store", names=[f"{base}: layer 2 ({evil})", f"member '{name}'"])
    assert_store_has_no_trace(tmp_path / "store")
    assert (snapshot_etc(), snapshot_tree(outside)) == before and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_cli_refuses_compressed_hostile_and_truncated_layers(tmp_path, kind):
    base = write(tmp_path / "base.tar", BASE)
    hostile = HOSTILE_LAYERS["symlink to /etc, then through it"][1](None)
    evil = write(tmp_path / f"evil.{kind}", compressed(kind, hostile))
    unpack_fails(base, evil, store=tmp_path / "store", names=[f"layer 2 ({evil})", "member 'a/passwd'"])
    blob = compressed(kind, tar_of(*(reg(f"f{index}", os.urandom(3000)) for index in range(40))))
    for label, cut in (("mid", blob[:len(blob) // 2]), ("end", blob[:-2])):
        layer = write(tmp_path / f"cut-{label}.{kind}", cut)
        unpack_fails(base, layer, store=tmp_path / "store", names=[f"layer 2 ({layer})", f"truncated {kind} stream"])
    assert_store_has_no_trace(tmp_path / "store")


@pytest.mark.parametrize("format, compression", [("docker", "gzip"), ("oci", "zstd")])
def test_cli_refuses_an_image_with_a_hostile_layer(tmp_path, format, compression):
    image = tmp_path / "evil-image.tar"
    write_image(image, [BASE, HOSTILE_LAYERS["dotdot"][1](None)], new_config(["base", "evil"]), format=format,
                compression=compression, repo_tag="evil:1")
    line = unpack_fails(image, store=tmp_path / "store", names=[f"{image}: layer 2 (", "member '../escaped'"])
    assert ("layer.tar" in line) == (format == "docker") and ("blobs/sha256/" in line) == (format == "oci")
    assert_store_has_no_trace(tmp_path / "store")
    assert os.listdir(tmp_path / "store/images") == []


def test_a_failed_unpack_leaves_layers_and_images_of_the_store_unchanged(tmp_path):
    store = tmp_path / "store"
    base, evil = write(tmp_path / "base.tar", BASE), write(tmp_path / "evil.tar", HOSTILE_LAYERS["dotdot"][1](None))
    write_image(tmp_path / "base-image.tar", [BASE], new_config(["base"]))      # the same layer, as an image
    assert run_layermount("unpack", tmp_path / "base-image.tar", "--store", store, "-q").returncode == 0
    before = snapshot_tree(store / "layers"), snapshot_tree(store / "images")
    layers = sorted(os.listdir(store / "layers"))
    unpack_fails(base, evil, store=store, names=["member '../escaped'"])
    assert (snapshot_tree(store / "layers"), snapshot_tree(store / "images")) == before
    assert_store_has_no_trace(store, layers)


def test_mounting_an_image_with_a_hostile_layer_mounts_nothing(tmp_path, mounts, store_dir):
    image = tmp_path / "evil-image.tar"
    write_image(image, [BASE, HOSTILE_LAYERS["symlink to /etc, then through it"][1](None)], new_config(["a", "b"]),
                compression="gzip")
    point = mounts.mountpoint()
    before = snapshot_etc()
    result = mounts.mount(image, mountpoint=point, expect_ok=False)
    assert result.returncode == 3, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and f"{image}: layer 2 (" in lines[0] and "member 'a/passwd'" in lines[0], result.stderr
    assert not is_mounted(str(point)) and os.listdir(point) == []
    assert_store_has_no_trace(store_dir)
    assert snapshot_etc() == before


def test_a_failed_unpack_leaves_no_blob_record(tmp_path):
    store = tmp_path / "store"
    base, evil = write(tmp_path / "base.tar", BASE), write(tmp_path / "evil.tar", HOSTILE_LAYERS["dotdot"][1](None))
    unpack_fails(base, evil, store=store, names=["member '../escaped'"])
    assert_store_has_no_trace(store)
    assert os.listdir(store / "blobs") == []


def test_unpacking_layer_tars_leaves_no_lock_files_under_random_keys(tmp_path):
    store = tmp_path / "store"
    base, evil = write(tmp_path / "base.tar", BASE), write(tmp_path / "evil.tar", HOSTILE_LAYERS["dotdot"][1](None))
    unpack_fails(base, evil, store=store, names=["member '../escaped'"])
    other = write(tmp_path / "other.tar", tar_of(reg("other", b"o")))
    assert run_layermount("unpack", base, other, "--store", store, "-q").returncode == 0
    assert len(os.listdir(store / "layers")) == 2
    assert [name for name in os.listdir(store / "locks") if name.startswith("unknown-")] == []


# ---- timing (printed, not asserted) ---------------------------------------------------------------
def test_timing_of_20000_small_files_against_gnu_tar(tmp_path):
    if shutil.which("tar") is None:
        pytest.skip("needs GNU tar")
    layer = tmp_path / "many.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(20_000):
            info, data = reg(f"d{index // 200:03}/f{index:05}", b"%d\n" % index)
            tar.addfile(info, io.BytesIO(data))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    started = time.perf_counter()
    with open(layer, "rb") as stream:
        stats = extract_layer(stream, ours)
    ours_seconds = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run(["tar", "-xf", layer, "-C", theirs], check=True)
    tar_seconds = time.perf_counter() - started
    print(f"\nextract_layer: {ours_seconds:.2f} s, tar -xf: {tar_seconds:.2f} s for 20000 files "
          f"({ours_seconds / tar_seconds:.1f}x)")
    assert stats.entries == 20_000
    listing = sorted(str(path.relative_to(ours)) for path in ours.rglob("*"))
    assert listing == sorted(str(path.relative_to(theirs)) for path in theirs.rglob("*"))
    assert (ours / "d099/f19999").read_bytes() == (theirs / "d099/f19999").read_bytes() == b"19999\n"
