"""The -o option parser: every option podman, buildah and fuse-overlayfs' manual use, as a table."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from unionfs.errors import UsageError
from test_rootless import as_user, user_dir, user_fuse  # noqa: F401 - fixtures
from unionfs.mountopts import IdRange, ViewOptions, fuse_passthrough, parse, split_options

SPLITS = [
    ("lowerdir=/a:/b,upperdir=/u,workdir=/w", ["lowerdir=/a:/b", "upperdir=/u", "workdir=/w"]),
    ("lowerdir=/a,,workdir=/w,", ["lowerdir=/a", "workdir=/w"]),                     # empty items
    (",", []),
    ('context="system_u:object_r:container_file_t:s0:c1,c2",nodev',
     ['context="system_u:object_r:container_file_t:s0:c1,c2"', "nodev"]),              # comma inside quotes
    (r"lowerdir=/a\,b,nodev", ["lowerdir=/a,b", "nodev"]),                             # escaped comma
    ('a="x,y",b="",c', ['a="x,y"', 'b=""', "c"]),
]


@pytest.mark.parametrize("text, items", SPLITS)
def test_split(text, items):
    assert split_options(text) == items


def test_unclosed_quote_is_a_usage_error():
    with pytest.raises(UsageError, match="double quote"):
        split_options('context="a:b,nodev')


# option -> (attribute path, expected value)
TABLE = [
    ("lowerdir=/l3:/l2::/l1", "lowerdirs", ["/l3", "/l2", "/l1"]),
    ("upperdir=/u", "upperdir", "/u"),
    ("workdir=/w", "workdir", "/w"),
    ("ro", "read_only", True),
    ("ro,rw", "read_only", False),
    ("suid", "suid", True),
    ("nosuid", "suid", False),
    ("dev", "dev", True),
    ("nodev", "dev", False),
    ("allow_other", "allow_other", True),
    ("noexec", "fuse", ["noexec"]),
    ("noatime,default_permissions,allow_root", "fuse", ["noatime", "default_permissions", "allow_root"]),
    ("max_read=131072", "fuse", ["max_read=131072"]),
    ('context="system_u:object_r:container_file_t:s0:c1,c2"', "selinux",
     {"context": "system_u:object_r:container_file_t:s0:c1,c2"}),
    ("rootcontext=system_u:object_r:etc_t:s0", "selinux", {"rootcontext": "system_u:object_r:etc_t:s0"}),
    ("volatile", "view.volatile", True),
    ("fsync=0", "view.volatile", True),
    ("volatile,fsync=1", "view.volatile", False),
    ("uidmapping=0:100000:65536", "view.uid_map", (IdRange(0, 100000, 65536),)),
    ("uidmapping=:0:100000:1:1:200000:10", "view.uid_map", (IdRange(0, 100000, 1), IdRange(1, 200000, 10))),
    ("gidmapping=0:100000:65536:65536:0:1", "view.gid_map",
     (IdRange(0, 100000, 65536), IdRange(65536, 0, 1))),
    ("squash_to_root", "view.squash_uid", 0),
    ("squash_to_root", "view.squash_gid", 0),
    ("squash_to_uid=1000", "view.squash_uid", 1000),
    ("squash_to_gid=1000", "view.squash_gid", 1000),
    ("squash_to_uid=7,squash_to_root", "view.squash_uid", 7),        # squash_to_uid= wins, in any order
    ("squash_to_uid=7,squash_to_root", "view.squash_gid", 0),
    ("squash_to_root,squash_to_gid=8", "view.squash_gid", 8),
    ("squash_to_uid=7", "view.squash_gid", None),
    ("xattr_permissions=2", "view.xattr_permissions", 2),
    ("xattr_permissions=0", "view.xattr_permissions", 0),
    ("xattr_permissions=1", "view.xattr_permissions", 1),
    ("noxattrs", "view.xattrs", False),
    ("noxattrs=1", "view.xattrs", False),
    ("noxattrs=0", "view.xattrs", True),
    ("redirect_dir=on", "no_effect", ["redirect_dir=on"]),
    ("index=off", "no_effect", ["index=off"]),
    ("xino=on,xino=off,xino=auto", "no_effect", ["xino=on", "xino=off", "xino=auto"]),
    ("userxattr", "no_effect", ["userxattr"]),
    ("metacopy=on", "no_effect", ["metacopy=on"]),
    ("timeout=1000", "no_effect", ["timeout=1000"]),
    ("threaded=1", "no_effect", ["threaded=1"]),
    ("fast_ino=1", "no_effect", ["fast_ino=1"]),
    ("writeback=0", "no_effect", ["writeback=0"]),
    ("static_nlink", "no_effect", ["static_nlink"]),
    ("ino32_t", "no_effect", ["ino32_t"]),
    ("noacl", "no_effect", ["noacl"]),
    ("bogus,frobnicate=3", "unknown", ["bogus", "frobnicate=3"]),
]


def attribute(parsed, path):
    value = parsed
    for name in path.split("."):
        value = getattr(value, name)
    return value


@pytest.mark.parametrize("text, path, expected", TABLE)
def test_option_table(text, path, expected):
    assert attribute(parse([text]), path) == expected


def test_defaults_mean_the_modes_own():
    parsed = parse(["lowerdir=/l"])
    assert (parsed.suid, parsed.dev, parsed.allow_other, parsed.read_only) == (None, None, None, False)
    assert parsed.view == ViewOptions() and parsed.unknown == [] and parsed.fuse == []


def test_what_containers_storage_passes():
    parsed = parse(["lowerdir=/s/l/A:/s/l/B,upperdir=/s/c/diff,workdir=/s/c/work,,volatile,nodev,"
                    'context="system_u:object_r:container_file_t:s0:c105,c945"'])
    assert parsed.lowerdirs == ["/s/l/A", "/s/l/B"] and parsed.upperdir == "/s/c/diff"
    assert parsed.dev is False and parsed.unknown == []
    assert parsed.view == ViewOptions(volatile=True)


def test_several_o_arguments_and_the_last_wins():
    parsed = parse(["lowerdir=/a,nosuid", "suid,lowerdir=/b:/c"])
    assert parsed.lowerdirs == ["/b", "/c"] and parsed.suid is True


@pytest.mark.parametrize("text, message", [
    ("uidmapping=0:100000", "triples"),
    ("uidmapping=", "triples"),
    ("uidmapping=a:b:c", "decimal"),
    ("uidmapping=0:100000:0", "empty"),
    ("uidmapping=0:4294967295:2", "past 2"),
    ("uidmapping=-1:100000:10", "decimal"),
    ("uidmapping=0:1_000:10", "decimal"),
    ("uidmapping=0: 1000:10", "decimal"),
    ("uidmapping=0:\u0661\u0660:10", "decimal"),
    ("squash_to_uid=\u00b3", "uid/gid number"),
    ("squash_to_uid=4294967296", "uid/gid number"),
    ("uidmapping=0:1000:10:5:2000:10", "container ranges overlap"),
    ("gidmapping=0:1000:10:100:1005:10", "host ranges overlap"),
    ("squash_to_uid=-1", "uid/gid number"),
    ("squash_to_gid=root", "uid/gid number"),
    ("xattr_permissions=3", "0, 1 or 2"),
    ("fsync=yes", "0 or 1"),
    ("noxattrs=2", "0 or 1"),
    ("lowerdir=", "names no directory"),
    ("upperdir=", "names no directory"),
])
def test_bad_values_are_usage_errors_naming_the_option(text, message):
    with pytest.raises(UsageError, match=message) as raised:
        parse([text])
    assert str(raised.value).startswith(text.partition("=")[0])


def test_selinux_labels_quoted_and_escaped_for_libfuse_or_dropped_without_selinux():
    parsed = parse(['context="system_u:object_r:container_file_t:s0:c1,c2",bogus'])
    options, warnings = fuse_passthrough(parsed, selinux=True)
    assert options == [r'context="system_u:object_r:container_file_t:s0:c1\,c2"']
    assert warnings == ["unknown option ignored: bogus"]
    options, warnings = fuse_passthrough(parsed, selinux=False)
    assert options == [] and warnings[-1] == "context= ignored: SELinux is not enabled"


# ---- through a real mount ---------------------------------------------------------

def mount_options_of(point) -> tuple[set[str], set[str]]:
    """(per-mount flags, superblock options) of ``point`` from /proc/self/mountinfo."""
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        if fields[4] == str(point):
            return set(fields[5].split(",")), set(fields[fields.index("-") + 3].split(","))
    raise AssertionError(f"{point} is not mounted")


@pytest.fixture
def lower(tmp_path):
    path = tmp_path / "lower"
    (path / "dir").mkdir(parents=True)
    (path / "dir" / "file").write_text("lower\n")
    os.chmod(path / "dir" / "file", 0o600)
    return path


@pytest.fixture
def rw_spec(tmp_path, lower):
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    return f"lowerdir={lower},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"


@pytest.fixture
def open_point():
    """A mountpoint others can reach (pytest's temp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="layermount-opts-"))
    os.chmod(path, 0o755)
    (path / "mnt").mkdir()
    yield path / "mnt"
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*command):
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command],
                          capture_output=True, text=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="fuse-overlayfs' mount_program defaults apply as root")
def test_as_root_lowerdir_mounts_get_the_mount_program_defaults(mounts, lower, open_point):
    """allow_other with the kernel's mode checks, suid and dev: what podman's containers need."""
    point = mounts.mount_lowers([lower], mountpoint=open_point)
    flags, options = mount_options_of(point)
    assert "allow_other" in options and "default_permissions" in options
    assert "nosuid" not in flags and "nodev" not in flags
    assert as_nobody("ls", str(point / "dir")).stdout == "file\n"              # others may enter ...
    denied = as_nobody("cat", str(point / "dir" / "file"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr      # ... modes still hold


@pytest.mark.skipif(os.geteuid() != 0, reason="fuse-overlayfs' mount_program defaults apply as root")
def test_nosuid_nodev_given_are_kept(mounts, lower):
    point = mounts.mount("-o", f"lowerdir={lower},nosuid,nodev", store=False)
    flags, _ = mount_options_of(point)
    assert {"nosuid", "nodev"} <= flags


def test_every_accepted_option_mounts_and_only_unknown_ones_are_warned_about(mounts, rw_spec):
    accepted = ("volatile,fsync=1,userxattr,xino=on,xino=off,xino=auto,metacopy=on,index=on,redirect_dir=on,"
                "timeout=1000,threaded=1,fast_ino=1,writeback=0,static_nlink,ino32_t,noacl,noatime,"
                'context="system_u:object_r:container_file_t:s0:c1,c2"')
    result = mounts.mount("-o", f"{rw_spec},,{accepted},frobnicate=1,", store=False, expect_ok=False)
    assert result.returncode == 0, result.stderr
    point = mounts.points[-1]
    assert "unknown option ignored: frobnicate=1" in result.stderr
    assert "unknown option" not in result.stderr.replace("unknown option ignored: frobnicate=1", "")
    (point / "dir" / "new").write_text("written\n")
    assert (point / "dir" / "file").read_text() == "lower\n"
    assert (point / "dir" / "new").read_text() == "written\n"


@pytest.mark.parametrize("foreground", [[], ["-f"]])
def test_a_mount_error_names_libfuses_reason_and_exits_5(mounts, lower, foreground):
    result = mounts.mount("-o", f"lowerdir={lower},max_read=lots", *foreground, store=False, expect_ok=False)
    assert result.returncode == 5
    assert result.stderr.strip().splitlines() == [
        f"layermount: mount {mounts.mountpoint()}: cannot mount: invalid parameter in option `max_read=lots'"]
    assert not mounts.points


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root to become nobody (setpriv)")
def test_fusermount3s_reason_reaches_an_unprivileged_user(user_dir, user_fuse):
    """Without user_allow_other in /etc/fuse.conf, fusermount3 refuses allow_other: its words, one line."""
    if "\nuser_allow_other" in "\n" + open("/etc/fuse.conf").read():
        pytest.skip("/etc/fuse.conf sets user_allow_other here")
    for name in ("lower", "mnt"):
        (user_dir / name).mkdir()
        os.chown(user_dir / name, 65534, 65534)
    result = as_user("-o", f"lowerdir={user_dir / 'lower'},allow_other", user_dir / "mnt", check=False)
    assert result.returncode == 5
    assert result.stderr.strip().splitlines() == [
        f"layermount: mount {user_dir / 'mnt'}: cannot mount: fusermount3: option allow_other only allowed "
        f"if 'user_allow_other' is set in /etc/fuse.conf"]
