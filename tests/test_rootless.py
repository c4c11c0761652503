"""Without root: unpack and mount as an unprivileged user, owners served from override xattrs.

The test runs as nobody and no capabilities but CAP_DAC_READ_SEARCH,
which only lets it traverse into /root, where this machine's Python lives;
it cannot chown, mknod devices, write others' files or mount by itself (fusermount3 does).
/dev/fuse is made 0666 for the test, as udev sets it on an ordinary Debian system.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import images
from unionfs.mount import FSTYPE, mount_entries

UID = GID = 65534   # nobody:nogroup (fusermount3 wants a passwd entry)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("fusermount3"),
                                reason="needs root to switch to an unprivileged user (setpriv) and fusermount3")


def as_user(*args, check=True, program=("-m", "unionfs")):
    command = ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups",
               "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search",
               sys.executable, *program, *map(str, args)]
    env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONPATH": str(Path(__file__).parents[1])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


LOOK = """
import json, os, sys
root = sys.argv[1]
out = {}
for path in ("bin/su", "owned", "etc/shadow", "dev/null"):
    st = os.lstat(os.path.join(root, path))
    out[path] = [st.st_uid, st.st_gid, st.st_mode, st.st_rdev]
out["xattrs"] = [name for name in os.listxattr(os.path.join(root, "bin/su")) if "override" in name]
out["os-release"] = open(os.path.join(root, "etc/os-release")).read()
print(json.dumps(out))
"""


@pytest.fixture
def user_fuse():
    """/dev/fuse as udev normally leaves it (0666); this machine has it 0600. Restored afterwards."""
    mode = os.stat("/dev/fuse").st_mode & 0o777
    os.chmod("/dev/fuse", 0o666)
    try:
        yield
    finally:
        os.chmod("/dev/fuse", mode)


@pytest.fixture
def user_dir():
    """A directory the unprivileged user owns (pytest's tmp dirs are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="layermount-rootless-"))
    os.chown(path, UID, GID)
    try:
        yield path
    finally:
        for point, kind in mount_entries():
            if kind == FSTYPE and point.startswith(str(path)):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def test_unprivileged_unpack_records_owners_and_the_mount_serves_them(user_dir, user_fuse):
    image = images.build(user_dir / "image.tar")
    os.chown(image, UID, GID)
    store = user_dir / "store"
    as_user("unpack", image, "--store", store, "-q")
    layer_files = list(store.glob("layers/*/diff/bin/su"))
    assert layer_files and os.stat(layer_files[0]).st_uid == UID            # not applied for real ...
    assert os.getxattr(layer_files[0], "user.containers.override_stat") == b"0:0:0104755"   # ... but recorded
    mountpoint = user_dir / "mnt"
    mountpoint.mkdir()
    os.chown(mountpoint, UID, GID)
    as_user(image, mountpoint, "--store", store, "--read-only", "-q")
    try:
        # Only the user who mounted may look inside (no allow_other), so the user looks.
        seen = json.loads(as_user(mountpoint, program=("-c", LOOK)).stdout)
        assert seen["bin/su"] == [0, 0, 0o104755, 0]
        assert seen["owned"][:3] == [1000, 1000, 0o100600]
        assert seen["etc/shadow"][:3] == [0, 42, 0o100640]
        assert seen["dev/null"] == [0, 0, 0o020666, os.makedev(1, 3)]
        assert seen["xattrs"] == []
        assert seen["os-release"] == "ID=demo\n"
    finally:
        as_user("umount", mountpoint, check=False)
    assert not any(point == str(mountpoint) for point, _ in mount_entries())
