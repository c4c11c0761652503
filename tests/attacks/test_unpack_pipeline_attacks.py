"""Attacks on the unpack pipeline: the read-ahead thread, the inflater and the fast header parse."""

from __future__ import annotations

import errno
import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# VmHWM is this process's own peak; ru_maxrss would carry over the forking pytest's through exec.
UNPACK_AND_REPORT_PEAK = """
import re, sys
from unionfs.image import open_layer_tars
from unionfs.store import LayerStore
layers = LayerStore(sys.argv[2]).unpack_image(open_layer_tars([sys.argv[1]]), jobs=1)
with open("/proc/self/status") as status:
    peak = re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)
print(layers[0].meta.tar_size, peak)
"""


def test_a_gzip_bomb_after_the_tar_end_is_hashed_in_bounded_memory(tmp_path):
    """A layer whose tar ends early and whose stream goes on with 512 MiB of zeros (0.5 MB
    compressed): the read-ahead thread must not race ahead and hold it, and the drain that
    hashes it must go chunk by chunk. Peak memory stays far below the bomb's size."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("small")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"small"))
    bomb_size = 512 << 20
    blob = tmp_path / "bomb.tar.gz"
    with gzip.open(blob, "wb", compresslevel=9) as compressor:
        compressor.write(buffer.getvalue())
        zeros = bytes(1 << 20)
        for _ in range(bomb_size >> 20):
            compressor.write(zeros)
    assert blob.stat().st_size < 1 << 20
    result = subprocess.run([sys.executable, "-c", UNPACK_AND_REPORT_PEAK, str(blob), str(tmp_path / "store")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    tar_size, peak_kib = map(int, result.stdout.split())
    assert tar_size == len(buffer.getvalue()) + bomb_size      # every byte was read and hashed
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB while draining a {bomb_size >> 20} MiB bomb"


def _posix_acl(*entries: tuple[int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) entries with the id undefined."""
    return (2).to_bytes(4, "little") + b"".join(tag.to_bytes(2, "little") + perm.to_bytes(2, "little")
                                                 + b"\xff\xff\xff\xff" for tag, perm in entries)


def test_a_default_acl_in_the_layer_does_not_change_the_modes_of_files_made_below_it(tmp_path):
    """Files of root's own owner are created with their final mode (no chmod after), which a
    default ACL on their directory would override. A hostile layer gives a directory a default
    ACL granting nothing to group and others, then puts a 0644, a 04755 and a 0666 file in it:
    each must still get exactly its mode (directory metadata is applied only at the end)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: only root sets system.* xattrs and owns files as root")
    from unionfs.extract import extract_layer
    acl = _posix_acl((0x01, 7), (0x04, 0), (0x20, 0))     # u::rwx g::--- o::---
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("d")
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        directory.pax_headers = {"SCHILY.xattr.system.posix_acl_default": acl.decode("utf-8", "surrogateescape")}
        tar.addfile(directory)
        for mode in (0o644, 0o4755, 0o666):
            info = tarfile.TarInfo(f"d/f{mode:o}")
            info.mode, info.size = mode, 1
            tar.addfile(info, io.BytesIO(b"x"))
    dest = tmp_path / "layer"
    dest.mkdir()
    extract_layer(io.BytesIO(buffer.getvalue()), dest, rootless=False)
    for mode in (0o644, 0o4755, 0o666):
        assert os.stat(dest / "d" / f"f{mode:o}").st_mode & 0o7777 == mode
    try:
        assert os.getxattr(dest / "d", "system.posix_acl_default") == acl   # the directory has it, at the end
    except OSError as exc:
        assert exc.errno == errno.EOPNOTSUPP, exc                                # no ACLs on this filesystem
