"""Layer extraction against hostile and unusual tars, each built here byte by byte.

Every extraction goes through ``extract``, which also proves that nothing
beside the destination changed: a sentinel directory with a file sits next
to it, and hostile members aim at it.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import pytest

from tars import MTIME, directory, entry, file, hardlink, symlink, tar_of
from unionfs.errors import ImageError, UnsafeArchive
from unionfs.extract import ExtractStats, _ForwardReader, extract_layer

OVERRIDE = "user.containers.override_stat"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


class ForwardStream:
    """A read-only, non-seekable stream, like the hashing reader the store passes."""

    def __init__(self, data: bytes):
        self._buffer = io.BytesIO(data)
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        return self._buffer.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class Box:
    """An empty destination beside a sentinel directory that no member may touch."""

    def __init__(self, root: Path):
        self.root = root
        self.dest = root / "dest"
        self.outside = root / "outside"
        self.dest.mkdir()
        self.outside.mkdir()
        (self.outside / "secret").write_bytes(b"keep me")
        (self.outside / "sub").mkdir()

    def snapshot(self) -> dict:
        """Everything below root except dest: type, mode, owner, size, times, links, content."""
        entries = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [name for name in dirnames if Path(dirpath, name) != self.dest]
            for name in [".", *dirnames, *filenames]:
                path = Path(dirpath, name)
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    content = os.readlink(path)
                elif stat.S_ISREG(st.st_mode):
                    content = hashlib.sha256(path.read_bytes()).hexdigest()
                else:
                    content = sorted(os.listdir(path)) if stat.S_ISDIR(st.st_mode) else None
                entries[str(path)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                                      st.st_nlink, content, sorted(os.listxattr(path, follow_symlinks=False)))
        return entries


@pytest.fixture
def box(tmp_path) -> Box:
    return Box(tmp_path)


def extract(box: Box, data: bytes, **options) -> ExtractStats:
    """Unpack ``data`` into box.dest; whatever happens, nothing outside dest may change."""
    before = box.snapshot()
    stream = ForwardStream(data)
    try:
        return extract_layer(stream, box.dest, **options)
    finally:
        assert box.snapshot() == before, "something outside the layer directory changed"
        assert not stream.closed




def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def with_checksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def gnu_sparse(name: str, real_size: int, segments: list[tuple[int, bytes]]) -> bytes:
    """An old-GNU sparse member ('S'), which tarfile reads but cannot write: map in the header."""
    info, _ = file(name)
    info.type = tarfile.GNUTYPE_SPARSE
    info.size = sum(len(chunk) for _, chunk in segments)
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    structs = [(offset, len(chunk)) for offset, chunk in segments]

    def put(block, position, number):
        block[position:position + 12] = b"%011o\0" % number

    for index, (offset, length) in enumerate(structs[:4]):
        put(header, 386 + 24 * index, offset)
        put(header, 398 + 24 * index, length)
    rest = structs[4:]
    header[482] = bool(rest)
    put(header, 483, real_size)
    blocks = [with_checksum(header)]
    while rest:
        block, batch, rest = bytearray(512), rest[:21], rest[21:]
        for index, (offset, length) in enumerate(batch):
            put(block, 24 * index, offset)
            put(block, 24 * index + 12, length)
        block[504] = bool(rest)
        blocks.append(bytes(block))
    return b"".join(blocks) + pad(b"".join(chunk for _, chunk in segments))


def xattr(path: Path, name: str) -> bytes:
    return os.getxattr(path, name, follow_symlinks=False)


def unsafe(box: Box, data: bytes, **options) -> UnsafeArchive:
    with pytest.raises(UnsafeArchive) as caught:
        extract(box, data, **options)
    assert "\n" not in str(caught.value)
    return caught.value


# ---- names ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../outside/secret", "a/../../outside/secret", "./../x", "a/b/../../..", "/../x"])
def test_dotdot_in_a_name_is_refused(box, name):
    error = unsafe(box, tar_of(file("ok", b"1"), file(name, b"pwned")))
    assert error.member == name
    assert "'..'" in str(error)


def test_absolute_and_dot_names_land_inside(box):
    extract(box, tar_of(file("/abs/file", b"a"), file("./rel", b"r"), file("//twice//slashed", b"t"),
                        file("././dots/./x", b"d")))
    assert (box.dest / "abs/file").read_bytes() == b"a"
    assert (box.dest / "rel").read_bytes() == b"r"
    assert (box.dest / "twice/slashed").read_bytes() == b"t"
    assert (box.dest / "dots/x").read_bytes() == b"d"


def test_a_nul_in_a_name_or_link_target_is_refused(box):
    evil, _ = file("plain")
    evil.pax_headers = {"path": "evil\0name"}
    assert "NUL" in str(unsafe(box, tar_of((evil, b"x"))))
    link, _ = symlink("link", "plain")
    link.pax_headers = {"linkpath": "/etc\0passwd"}
    assert "NUL" in str(unsafe(box, tar_of((link, b""))))


def test_names_beyond_path_max_or_name_max_are_refused(box):
    too_long = "d/" * 2048 + "f"
    assert "PATH_MAX (4095 bytes)" in str(unsafe(box, tar_of(file(too_long, b"x"))))
    long_component = "x" * 256
    assert "NAME_MAX (255 bytes)" in str(unsafe(box, tar_of(file("a/" + long_component, b"x"))))


@pytest.mark.parametrize("format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_and_long_link_targets_work(box, format):
    deep = "/".join(["p" * 200] * 3) + "/file"                  # 600+ bytes: beyond ustar's 255
    target = "/" + "/".join(["t" * 250] * 4)                     # 1000+ bytes, a dangling absolute target
    extract(box, tar_of(file(deep, b"deep"), symlink("sym", target), hardlink("hard", deep),
                        hardlink("q" * 150, "/" + deep), format=format))
    assert (box.dest / deep).read_bytes() == b"deep"
    assert os.readlink(box.dest / "sym") == target
    assert os.stat(box.dest / "hard").st_ino == os.stat(box.dest / deep).st_ino == os.stat(box.dest / ("q" * 150)).st_ino


# ---- symlinks -----------------------------------------------------------------------
def test_no_member_is_written_through_a_symlinked_parent(box):
    target = str(box.outside)                                     # stands in for /etc
    error = unsafe(box, tar_of(symlink("a", target), file("a/passwd", b"root::0:0")))
    assert "parent 'a' is a symlink" in str(error)
    assert error.member == "a/passwd"
    assert os.readlink(box.dest / "a") == target


def test_symlinks_to_dotdot_cannot_be_chained_out(box):
    error = unsafe(box, tar_of(symlink("a", ".."), symlink("a/b", ".."), file("a/b/x", b"x")))
    assert "parent 'a' is a symlink" in str(error)
    assert not (box.root / "x").exists()


def test_symlink_targets_are_stored_verbatim_and_never_followed(box):
    extract(box, tar_of(symlink("abs", str(box.outside / "secret")), symlink("loop", "loop"),
                        symlink("dangling", "no/such"), symlink("up", "../../..")))
    assert os.readlink(box.dest / "abs") == str(box.outside / "secret")
    assert os.readlink(box.dest / "loop") == "loop"
    assert os.readlink(box.dest / "dangling") == "no/such"
    assert os.readlink(box.dest / "up") == "../../.."


def test_a_directory_replaced_by_a_symlink_is_no_way_out(box):
    error = unsafe(box, tar_of(directory("d"), file("d/f", b"1"), symlink("d", str(box.outside)),
                               file("d/secret", b"overwritten")))
    assert "parent 'd' is a symlink" in str(error)


def test_the_root_cannot_be_replaced(box):
    # umoci CVE-2021-29136: "." as a symlink, then members written through it.
    error = unsafe(box, tar_of(symlink(".", str(box.outside)), file("secret", b"x")))
    assert "layer root" in str(error)
    assert "layer root" in str(unsafe(box, tar_of(file("./", b"x"))))


# ---- hardlinks ------------------------------------------------------------------------
def test_hardlinks_share_an_inode(box):
    stats = extract(box, tar_of(file("a/f", b"data", mode=0o600), hardlink("b/g", "a/f"),
                                hardlink("/c", "./a/f"), hardlink("a/f", "a/f")))
    inodes = {os.stat(box.dest / name).st_ino for name in ("a/f", "b/g", "c")}
    assert len(inodes) == 1 and os.stat(box.dest / "a/f").st_nlink == 3
    assert stats.entries == 4 and stats.bytes == 4


@pytest.mark.parametrize("target", ["/etc/passwd", "outside/secret"])
def test_hardlink_to_a_path_outside_the_layer_is_refused(box, target):
    error = unsafe(box, tar_of(hardlink("h", target)))
    assert "not in this layer" in str(error)


def test_hardlink_with_dotdot_is_refused(box):
    error = unsafe(box, tar_of(hardlink("h", "../outside/secret")))
    assert "hardlink target '../outside/secret'" in str(error) and "'..'" in str(error)


def test_hardlink_to_a_member_not_yet_seen_is_refused(box):
    error = unsafe(box, tar_of(hardlink("h", "later"), file("later", b"x")))
    assert "hardlink to 'later' which is not in this layer" in str(error)


def test_hardlink_to_a_directory_is_refused(box):
    assert "hardlink to directory 'd'" in str(unsafe(box, tar_of(directory("d"), hardlink("h", "d"))))
    assert "hardlink to directory" in str(unsafe(box, tar_of(hardlink("h", "."))))


def test_hardlink_to_a_symlink_links_the_symlink_itself(box):
    secret = str(box.outside / "secret")
    extract(box, tar_of(symlink("s", secret), hardlink("h", "s")))
    assert os.readlink(box.dest / "h") == secret
    assert os.lstat(box.dest / "h").st_ino == os.lstat(box.dest / "s").st_ino


def test_hardlink_to_a_file_whose_parent_became_a_symlink_is_refused(box):
    error = unsafe(box, tar_of(file("d/f", b"1"), symlink("d", str(box.outside)), hardlink("h", "d/f")))
    assert "not in this layer" in str(error)


# ---- devices, fifos, whiteouts ------------------------------------------------------
def devices():
    return tar_of(entry("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
                  entry("dev/sda", tarfile.BLKTYPE, mode=0o660, gid=6, devmajor=8, devminor=0),
                  entry("run/fifo", tarfile.FIFOTYPE, mode=0o620, uid=7, gid=8))


@as_root
def test_devices_and_fifos_as_root_are_real(box):
    stats = extract(box, devices(), rootless=False)
    null, sda, fifo = (os.lstat(box.dest / name) for name in ("dev/null", "dev/sda", "run/fifo"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3) and stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(sda.st_mode) and sda.st_rdev == os.makedev(8, 0) and sda.st_gid == 6
    assert stat.S_ISFIFO(fifo.st_mode) and (fifo.st_uid, fifo.st_gid) == (7, 8) and stat.S_IMODE(fifo.st_mode) == 0o620
    assert not stats.overrides


def test_devices_and_fifos_rootless_are_files_described_by_the_override(box):
    stats = extract(box, devices(), rootless=True)
    expected = {"dev/null": b"0:0:020666:1:3", "dev/sda": b"0:6:060660:8:0", "run/fifo": b"7:8:010620"}
    for name, value in expected.items():
        st = os.lstat(box.dest / name)
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 0
        assert xattr(box.dest / name, OVERRIDE) == value
    assert stats.overrides


@pytest.mark.parametrize("marker, shown", [(".wh..", "'.'"), ("d/.wh...", "'..'")])
def test_whiteouts_of_dot_and_dotdot_are_refused(box, marker, shown):
    assert f"whiteout of {shown}" in str(unsafe(box, tar_of(file(marker))))


def test_whiteout_markers_are_kept_as_files(box):
    extract(box, tar_of(file(".wh.gone"), directory("d"), file("d/.wh..wh..opq")))
    for marker in (".wh.gone", "d/.wh..wh..opq"):
        assert (box.dest / marker).is_file() and (box.dest / marker).stat().st_size == 0


# ---- duplicates ---------------------------------------------------------------------
def test_the_last_of_duplicate_members_wins(box):
    extract(box, tar_of(
        file("f", b"first"), file("f", b"second"),
        directory("was_dir"), file("was_dir/child", b"c"), directory("was_dir/sub"), file("was_dir/sub/x"),
        file("was_dir", b"now a file"),
        file("was_file", b"x"), directory("was_file", mode=0o700), file("was_file/inside", b"i"),
        directory("dir", mode=0o700), file("dir/keep", b"k"), directory("dir", mode=0o750),
        directory("to_link"), file("to_link/x"), symlink("to_link", "elsewhere"),
        symlink("link_to_file", "t"), file("link_to_file", b"plain"),
    ))
    assert (box.dest / "f").read_bytes() == b"second"
    assert (box.dest / "was_dir").read_bytes() == b"now a file"
    assert (box.dest / "was_file/inside").read_bytes() == b"i"
    assert (box.dest / "dir/keep").read_bytes() == b"k" and stat.S_IMODE((box.dest / "dir").stat().st_mode) == 0o750
    assert os.readlink(box.dest / "to_link") == "elsewhere"
    assert not (box.dest / "link_to_file").is_symlink() and (box.dest / "link_to_file").read_bytes() == b"plain"


def test_replacing_a_very_deep_tree_works(box):
    deep = "a/" * 1500 + "leaf"                                   # deeper than the recursion limit
    extract(box, tar_of(file(deep, b"x"), file("a", b"flat")))
    assert (box.dest / "a").read_bytes() == b"flat"


# ---- file data ------------------------------------------------------------------------
def test_file_data_larger_than_a_chunk(box):
    data = os.urandom(2 * 1024 * 1024 + 12345)
    stats = extract(box, tar_of(file("big", data), file("after", b"ok")))
    assert (box.dest / "big").read_bytes() == data and (box.dest / "after").read_bytes() == b"ok"
    assert stats.bytes == len(data) + 2


def test_gnu_sparse_member_keeps_its_content_and_holes(box):
    real_size = 8 << 20
    segments = [(0, b"head"), (1 << 20, b"one"), (2 << 20, b"two" * 2000), (3 << 20, b"three"),
                (4 << 20, b"four"), (5 << 20, b"five"), (7 << 20, b"tail")]   # > 4: extended header too
    stats = extract(box, gnu_sparse("sparse", real_size, segments) + tar_of(file("after", b"ok")))
    expected = bytearray(real_size)
    for offset, chunk in segments:
        expected[offset:offset + len(chunk)] = chunk
    assert (box.dest / "sparse").read_bytes() == expected
    assert (box.dest / "sparse").stat().st_blocks * 512 < real_size // 4
    assert (box.dest / "after").read_bytes() == b"ok"
    assert stats.bytes == sum(len(chunk) for _, chunk in segments) + 2


def test_pax_sparse_member_keeps_its_content(box):
    segments = [(4096, b"middle"), (10000, b"end")]
    sparse_map = pad(f"{len(segments)}\n".encode() + b"".join(b"%d\n%d\n" % (o, len(c)) for o, c in segments))
    info, stored = file("GNUSparseFile.0/s", sparse_map + b"middle" + b"end")
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "s",
                        "GNU.sparse.realsize": "10003"}
    extract(box, tar_of((info, stored)))
    assert (box.dest / "s").read_bytes() == bytes(4096) + b"middle" + bytes(10000 - 4102) + b"end"


def test_overlapping_sparse_map_is_corrupt(box):
    with pytest.raises(ImageError, match="corrupt sparse map"):
        extract(box, gnu_sparse("s", 100, [(10, b"abcdef"), (12, b"x")]))


# ---- damaged streams -----------------------------------------------------------------
def test_stream_truncated_inside_a_member(box):
    data = tar_of(file("big", os.urandom(10000)), file("next"))
    with pytest.raises(ImageError, match=r"corrupt tar .*'big'.*unexpected end of data") as caught:
        extract(box, data[:512 + 5000])
    assert not isinstance(caught.value, UnsafeArchive)


def test_stream_truncated_inside_a_header(box):
    data = tar_of(file("a", b"x"), file("b", b"y"))
    with pytest.raises(ImageError, match="corrupt tar"):
        extract(box, data[:1024 + 300])


@pytest.mark.parametrize("which", [0, 1])
def test_corrupt_header_checksum(box, which):
    data = bytearray(tar_of(file("a", b"x"), file("b", b"y"), file("c", b"z"), format=tarfile.USTAR_FORMAT))
    data[which * 1024 + 10] ^= 0x55                                     # inside a name field
    with pytest.raises(ImageError, match=f"corrupt tar at byte {which * 1024}: bad checksum"):
        extract(box, bytes(data))


def test_garbage_after_the_end_of_archive_is_left_unread(box):
    garbage = os.urandom(3000)
    stream = ForwardStream(tar_of(file("a", b"x")) + garbage)
    extract_layer(stream, box.dest)
    assert (box.dest / "a").read_bytes() == b"x"
    assert garbage.endswith(stream.read())                              # the caller drains the rest


def test_an_empty_stream_is_corrupt(box):
    with pytest.raises(ImageError, match="corrupt tar"):
        extract(box, b"")


def test_oversized_extended_header_is_refused_before_reading_it(box):
    info, _ = file("a")
    info.pax_headers = {"comment": "x" * (9 << 20)}
    with pytest.raises(ImageError, match="extended header of"):
        extract(box, tar_of((info, b"")))


def test_out_of_range_owner_is_an_image_error(box):
    info, _ = file("a")
    info.pax_headers = {"uid": str(1 << 40)}
    with pytest.raises(ImageError, match=r"member 'a': uid \d+ out of range"):
        extract(box, tar_of((info, b"")))


@pytest.mark.parametrize("mtime", ["NaN", "1e400", "-1e30", "soon"])
def test_unusable_pax_mtime_is_an_image_error(box, mtime):
    info, _ = file("a")
    info.pax_headers = {"mtime": mtime}
    with pytest.raises(ImageError, match=r"member 'a': mtime .* out of range"):
        extract(box, tar_of((info, b"")))


# ---- metadata ----------------------------------------------------------------------------
@as_root
def test_metadata_as_root(box):
    info, _ = file("bin/su", b"#!", mode=0o4755, uid=1234, gid=5678, mtime=1_000_000_000)
    info.pax_headers = {"SCHILY.xattr.user.foo": "bar", "SCHILY.xattr.trusted.x": "\x01\x02",
                        "SCHILY.xattr.user.containers.override_stat": "0:0:0104777"}
    fractional, _ = file("frac", mtime=0)
    fractional.pax_headers = {"mtime": "1234567890.123456789"}
    stats = extract(box, tar_of(
        directory("tmp", mode=0o1777, mtime=1_100_000_000), file("tmp/later", b"l"), (info, b"#!"), (fractional, b""),
        symlink("bin/sh", "su", uid=42, gid=43, mtime=1_200_000_000), directory("bin", mode=0o2755, uid=3, gid=4),
    ), rootless=False)
    su, tmp, sh, bin_dir = (os.lstat(box.dest / name) for name in ("bin/su", "tmp", "bin/sh", "bin"))
    assert (su.st_uid, su.st_gid, stat.S_IMODE(su.st_mode), su.st_mtime_ns) == (1234, 5678, 0o4755, 10**18)
    assert xattr(box.dest / "bin/su", "user.foo") == b"bar"
    assert xattr(box.dest / "bin/su", "trusted.x") == b"\x01\x02"
    assert OVERRIDE not in os.listxattr(box.dest / "bin/su")          # an image may not forge our bookkeeping
    assert stat.S_IMODE(tmp.st_mode) == 0o1777 and tmp.st_mtime_ns == 1_100_000_000 * 10**9
    assert (sh.st_uid, sh.st_gid, sh.st_mtime_ns) == (42, 43, 1_200_000_000 * 10**9)
    assert (bin_dir.st_uid, bin_dir.st_gid, stat.S_IMODE(bin_dir.st_mode)) == (3, 4, 0o2755)
    assert bin_dir.st_mtime_ns == MTIME * 10**9                         # set after its children
    assert os.lstat(box.dest / "frac").st_mtime_ns == 1234567890123456789
    assert not stats.overrides


# Files of our own owner are made with their mode at open (no chown, no chmod): these are the
# cases where the kernel would give such a file something else, so the mode is set as before.
def posix_acl(*entries: tuple[int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) with the id undefined."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries)


ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER = 0x01, 0x04, 0x20
MODES = (0o644, 0o755, 0o4755, 0o2711, 0o1777, 0o600, 0o444, 0o000, 0o666, 0o777)


def modes_and_owners(box: Box) -> dict:
    return {name: (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
            for name in os.listdir(box.dest / "d") for st in [os.lstat(box.dest / "d" / name)]}


def own_files_tar() -> bytes:
    return tar_of(*(file(f"d/m{mode:o}", b"x", mode=mode, uid=0, gid=0) for mode in MODES),
                  file("d/other", b"x", mode=0o4755, uid=7, gid=8))


def expected_modes() -> dict:
    return {**{f"m{mode:o}": (mode, 0, 0) for mode in MODES}, "other": (0o4755, 7, 8)}


@as_root
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_own_files_get_exactly_their_mode_whatever_the_umask(box, umask):
    old = os.umask(umask)
    try:
        extract(box, own_files_tar(), rootless=False)
    finally:
        os.umask(old)
    assert modes_and_owners(box) == expected_modes()


@as_root
def test_own_files_get_exactly_their_mode_under_a_default_acl(box):
    """A default ACL on the layer root replaces the umask for everything made below it."""
    try:
        os.setxattr(box.dest, "system.posix_acl_default",
                    posix_acl((ACL_USER_OBJ, 7), (ACL_GROUP_OBJ, 0), (ACL_OTHER, 0)))
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on {box.dest}: {exc.strerror}")
    extract(box, own_files_tar(), rootless=False)
    assert modes_and_owners(box) == expected_modes()


@as_root
def test_own_files_get_their_group_under_a_setgid_root_of_another_group(box):
    os.chown(box.dest, 0, 4321)
    os.chmod(box.dest, 0o2775)
    extract(box, own_files_tar(), rootless=False)
    assert modes_and_owners(box) == expected_modes()


def test_rootless_records_owner_and_mode_in_the_override(box):
    stats = extract(box, tar_of(
        directory(".", mode=0o750),
        directory("etc", mode=0o555, uid=0, gid=0),
        file("etc/shadow", b"s", mode=0o640, gid=42),
        file("usr/bin/passwd", b"p", mode=0o4755, uid=0),
        symlink("etc/mtab", "/proc/mounts", uid=5),
    ), rootless=True)
    expected = {".": b"0:0:040750", "etc": b"0:0:040555", "etc/shadow": b"0:42:0100640",
                "usr": b"0:0:040755", "usr/bin/passwd": b"0:0:0104755"}
    for name, value in expected.items():
        assert xattr(box.dest / name, OVERRIDE) == value, name
    modes = {name: stat.S_IMODE(os.lstat(box.dest / name).st_mode) for name in ("etc", "etc/shadow", "usr/bin/passwd")}
    assert modes == {"etc": 0o755, "etc/shadow": 0o640, "usr/bin/passwd": 0o755}   # u+rw(x), never setuid
    assert os.readlink(box.dest / "etc/mtab") == "/proc/mounts"
    assert stats.overrides


def test_rootless_keeps_user_xattrs_only(box):
    info, _ = file("f")
    info.pax_headers = {"SCHILY.xattr.user.keep": "1", "SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}
    extract(box, tar_of((info, b"")), rootless=True)
    names = set(os.listxattr(box.dest / "f"))
    assert "user.keep" in names and "security.capability" not in names


@pytest.mark.parametrize("rootless", [False, True])
def test_read_only_directory_with_children(box, rootless):
    if not rootless and os.geteuid() != 0:
        pytest.skip("needs root")
    extract(box, tar_of(directory("ro", mode=0o555), directory("ro/sub", mode=0o500), file("ro/sub/f", b"x"),
                        file("ro/g", b"y")), rootless=rootless)
    assert (box.dest / "ro/sub/f").read_bytes() == b"x" and (box.dest / "ro/g").read_bytes() == b"y"
    if rootless:
        assert xattr(box.dest / "ro", OVERRIDE) == b"0:0:040555"
    else:
        assert stat.S_IMODE((box.dest / "ro").stat().st_mode) == 0o555
        assert stat.S_IMODE((box.dest / "ro/sub").stat().st_mode) == 0o500


# ---- the forward reader tarfile's file mode reads through ----------------------------------------
class Pieces(ForwardStream):
    """A forward stream that hands out at most ``step`` bytes per read."""

    def __init__(self, data: bytes, step: int):
        super().__init__(data)
        self._step = step

    def read(self, size: int = -1) -> bytes:
        return super().read(min(size, self._step))


@pytest.mark.parametrize("step", [1, 511, 4096, 1 << 20])
def test_the_forward_reader_reads_whole_tells_and_seeks_only_ahead(step):
    data = bytes(range(256)) * 40
    reader = _ForwardReader(Pieces(data, step))
    assert reader.read(512) == data[:512] and reader.tell() == 512
    assert reader.seek(3000) == 3000 and reader.read(700) == data[3000:3700]
    reader.seek(3700)                                                   # a seek to where it is
    with pytest.raises(tarfile.StreamError):
        reader.seek(3699)                                               # never back: no byte is read twice
    assert reader.read(len(data)) == data[3700:] and reader.tell() == len(data)
    assert reader.read(512) == b""
