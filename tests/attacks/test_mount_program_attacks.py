"""Attacks on the mount_program surface: the -o string and the fuse-overlayfs defaults as root.

As root an -o lowerdir= mount is allow_other with suid and dev, as podman needs; these cases
check what another user on the host can and cannot do with that, and that the option string
cannot be turned against the mount or the terminal.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import run_layermount
from test_rootless import as_user, user_dir, user_fuse  # noqa: F401 - fixtures
from unionfs.mount import mount_entries
from unionfs.mountopts import fuse_passthrough, parse

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root to mount and to act as nobody (setpriv)")


def flags_of(point: Path) -> set[str]:
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(point):
            return set(fields[5].split(",")) | set(fields[fields.index("-") + 3].split(","))
    raise AssertionError(f"{point} is not mounted")


def tree_state(root: Path) -> list[tuple[str, int, int, int]]:
    return sorted((str(path.relative_to(root)), path.lstat().st_mode, path.lstat().st_uid, path.lstat().st_size)
                  for path in root.rglob("*"))


@needs_root
def test_unprivileged_user_cannot_get_suid_or_dev_through_the_o_string(user_dir, user_fuse):
    """nobody asks for suid,dev (the root defaults) by name: the mount must still be nosuid,nodev."""
    for name in ("lower", "mnt"):
        (user_dir / name).mkdir()
        os.chown(user_dir / name, NOBODY, NOBODY)
    point = user_dir / "mnt"
    result = as_user("-o", f"lowerdir={user_dir / 'lower'},suid,dev", point, check=False)
    try:
        assert result.returncode == 0, result.stderr          # fusermount3 mounts, and drops both
        assert {"nosuid", "nodev"} <= flags_of(point)
    finally:
        if any(entry == str(point) for entry, _ in mount_entries()):
            as_user("umount", point, check=False)


@needs_root
def test_another_user_on_the_host_cannot_change_a_root_mount_program_mount(mounts, tmp_path):
    """allow_other lets nobody in; default_permissions must keep root's modes: no create in a 0755
    root dir, no chmod, no read of a 0600 file, no write to a 0644 file, and the upper untouched."""
    open_dir = Path(tempfile.mkdtemp(prefix="layermount-attack-"))
    try:
        os.chmod(open_dir, 0o755)
        lower, upper, work, point = (open_dir / name for name in ("lower", "upper", "work", "mnt"))
        for directory in (lower / "etc", upper, work, point):
            directory.mkdir(parents=True)
        (lower / "etc" / "shadow").write_text("root:secret\n")
        os.chmod(lower / "etc" / "shadow", 0o600)
        (lower / "etc" / "motd").write_text("hello\n")
        mounts.mount("-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mountpoint=point, store=False)
        before = tree_state(upper), tree_state(lower)
        script = (f"cd {point}/etc; cat motd; cat shadow || echo no-read; echo x > motd || echo no-write; "
                  f"touch new || echo no-create; chmod 666 motd || echo no-chmod; rm motd || echo no-rm; "
                  f"ln motd link || echo no-link; mv motd moved || echo no-rename")
        seen = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               "sh", "-c", script], capture_output=True, text=True)
        assert seen.stdout.split() == ["hello", "no-read", "no-write", "no-create", "no-chmod", "no-rm",
                                       "no-link", "no-rename"]
        assert (tree_state(upper), tree_state(lower)) == before
    finally:
        mounts.cleanup()
        shutil.rmtree(open_dir, ignore_errors=True)


def test_escape_sequences_in_an_unknown_option_do_not_reach_the_terminal(mounts, tmp_path):
    """An option carrying a terminal escape (set-title, bell) is warned about escaped."""
    (tmp_path / "lower").mkdir()
    result = mounts.mount("-o", f"lowerdir={tmp_path / 'lower'},\x1b]0;pwned\x07x\x1b[2J", store=False,
                          expect_ok=False)
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert "unknown option ignored: \\x1b]0;pwned\\x07x\\x1b[2J" in result.stderr


def libfuse_split(option: str) -> list[str]:
    """How libfuse's fuse_opt splits one -o argument: at commas, a backslash escaping the next character."""
    items, current, escaped = [], "", False
    for char in option:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ",":
            items, current = items + [current], ""
        else:
            current += char
    return items + [current]


@pytest.mark.parametrize("label", ['"a:b:c:s0:c1,allow_other,dev"', '"a\\\\,allow_other"', '"a\\,suid"'])
def test_a_selinux_label_cannot_smuggle_fuse_options(label):
    """A label is handed to libfuse as one option whatever commas and backslashes it holds."""
    parsed = parse([f"lowerdir=/l,context={label}"])
    options, _ = fuse_passthrough(parsed, selinux=True)
    assert len(options) == 1
    pieces = libfuse_split(options[0])
    assert len(pieces) == 1 and pieces[0].startswith('context="')


def test_bad_numbers_are_usage_errors_not_crashes():
    """Digits of other scripts pass str.isdigit() but not int(): exit 2 with a line, never a traceback."""
    for option in ("squash_to_uid=\u00b3", "uidmapping=0:\u0661:1", "squash_to_gid=99999999999999999999"):
        result = run_layermount("-o", f"lowerdir=/nonexistent,{option}", "/nonexistent")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_libfuses_reason_is_escaped_too(mounts, tmp_path):
    """libfuse echoes a bad value back in its reason; that must not carry an escape to the terminal."""
    (tmp_path / "lower").mkdir()
    result = mounts.mount("-o", f"lowerdir={tmp_path / 'lower'},max_read=\x1b[2J", store=False, expect_ok=False)
    assert result.returncode == 5 and "\x1b" not in result.stderr
    assert "invalid parameter in option `max_read=\\x1b[2J'" in result.stderr


@needs_root
def test_a_user_cannot_make_their_file_setuid_root_through_an_override_xattr(mounts):
    """A layer marked as one whose entries carry user.containers.override_stat (containers/storage's
    force_mask, fuse-overlayfs' rule): a user who owns a file in it sets that xattr on their own
    file, as anyone may for user.*, claiming 0:0:04755. As root the mount is suid: the claim would
    make a setuid-root binary. Only entries of root (or the daemon's user) may claim an owner."""
    open_dir = Path(tempfile.mkdtemp(prefix="layermount-claim-"))     # nobody must reach their file
    os.chmod(open_dir, 0o755)
    try:
        check_claims(open_dir / "lower", mounts)
    finally:
        shutil.rmtree(open_dir)


def check_claims(lower: Path, mounts) -> None:
    (lower / "bin").mkdir(parents=True)
    os.setxattr(lower, "user.containers.override_stat", b"0:0:0755")
    for name, owner in (("theirs", NOBODY), ("roots", 0)):
        shutil.copy("/bin/true", lower / "bin" / name)
        os.chown(lower / "bin" / name, owner, owner)
        os.chmod(lower / "bin" / name, 0o755)
    subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "setfattr", "-n",
                    "user.containers.override_stat", "-v", "0:0:0104755", lower / "bin" / "theirs"], check=True)
    os.setxattr(lower / "bin" / "roots", "user.containers.override_stat", b"0:0:0104711")
    point = mounts.mount_lowers([lower])
    assert "nosuid" not in flags_of(point)
    theirs = os.stat(point / "bin" / "theirs")
    assert (theirs.st_uid, oct(theirs.st_mode)) == (NOBODY, oct(0o100755))
    assert oct(os.stat(point / "bin" / "roots").st_mode) == oct(0o104711)   # root's own record stands
