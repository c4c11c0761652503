"""The merged view on temp dirs, without FUSE: listings, lookups, inode numbers, copy-up, changes, cuts.

These drive unionfs.overlay through its facade the way fuse_ops does; the
same behaviour through a real mount is tested in test_mount.py, test_write.py
and against kernel overlayfs in test_oracle.py.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
import trio

from unionfs.layerform import OCI
from unionfs.overlay import AttrChange, Layer, MergedView, UpperLayer, ViewRouter


def tree(root, spec):
    """spec maps relative paths to bytes (a file), None (a directory) or ("link", target)."""
    root.mkdir(parents=True, exist_ok=True)
    for relpath, value in spec.items():
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        if value is None:
            path.mkdir(exist_ok=True)
        elif isinstance(value, tuple):
            os.symlink(value[1], path)
        else:
            path.write_bytes(value)
    return root


@pytest.fixture
def stack(tmp_path):
    lower = tree(tmp_path / "lower", {"etc/passwd": b"root\n", "etc/gone": b"x", "opt/old": b"old",
                                      "keep/a": b"a", "same": b"one"})
    os.link(lower / "same", lower / "same-too")
    upper_layer = tree(tmp_path / "top", {"etc/.wh.gone": b"", "opt/.wh..wh..opq": b"", "opt/new": b"new",
                                          "etc/hostname": b"box"})
    (tmp_path / "upper").mkdir()
    (tmp_path / "work").mkdir()
    return tmp_path, [upper_layer, lower]


@pytest.fixture
def view(stack):
    """The stack merged, with a writable OCI-form upper."""
    merged = open_view(*stack)
    yield merged
    merged.close()


def open_view(tmp_path, lowers, writable=True):
    layers = [Layer.open(path, overlay_form=False) for path in lowers]
    upper = UpperLayer(str(tmp_path / "upper"), str(tmp_path / "work"), OCI) if writable else None
    return MergedView(layers, upper)


def names(view, node):
    return sorted(view.listing(node))


def walk(view, relpath):
    node = view.root
    for part in relpath.encode().split(b"/"):
        node = view.lookup(node, part)
        assert node is not None, relpath
    return node


def test_listing_applies_whiteouts_and_opaque_markers_and_hides_them(stack):
    tmp_path, lowers = stack
    view = open_view(tmp_path, lowers, writable=False)
    try:
        assert names(view, view.root) == [b"etc", b"keep", b"opt", b"same", b"same-too"]
        assert names(view, walk(view, "etc")) == [b"hostname", b"passwd"]
        assert names(view, walk(view, "opt")) == [b"new"]
        assert view.lookup(walk(view, "etc"), b"gone") is None
        assert walk(view, "etc").sources == (1, 2)          # a merged directory
        assert walk(view, "opt").sources == (1,)            # its opaque copy ends it
    finally:
        view.close()


def test_hardlinks_share_st_ino_and_a_lookup_counts_until_forgotten(stack):
    tmp_path, lowers = stack
    view = open_view(tmp_path, lowers, writable=False)
    try:
        one, two = walk(view, "same"), walk(view, "same-too")
        assert one is two and one.ino == os.lstat(lowers[1] / "same").st_ino
        assert one.lookups == 2
        view.forget(one.ino, 2)
        with pytest.raises(OSError) as raised:
            view.node(one.ino)
        assert raised.value.errno == errno.ENOENT
        view.forget(view.root.ino, 100)
        assert view.node(view.root.ino) is view.root   # the root is never forgotten
    finally:
        view.close()


def test_char_0_0_is_a_whiteout_only_in_a_layer_of_overlay_form(tmp_path):
    lower = tree(tmp_path / "lower", {"dev/null0": b"was a file"})
    top = tree(tmp_path / "top", {"dev": None})
    try:
        os.mknod(top / "dev/null0", stat.S_IFCHR | 0o600, 0)
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    for overlay_form, expected in ((True, []), (False, [b"null0"])):
        view = MergedView([Layer.open(top, overlay_form=overlay_form), Layer.open(lower, overlay_form=overlay_form)])
        try:
            assert names(view, walk(view, "dev")) == expected
            if expected:
                assert stat.S_ISCHR(walk(view, "dev/null0").attr.mode)
        finally:
            view.close()


def test_copy_up_keeps_st_ino_and_leaves_the_lower_untouched(stack, view):
    tmp_path, lowers = stack
    node = walk(view, "keep/a")
    ino = node.ino
    trio.run(lambda: view.copy_up(node))
    assert node.child.in_upper and node.ino == ino
    view.set_attributes(node, AttrChange(size=0, mode=0o600, mtime_ns=10**9))
    assert (tmp_path / "upper/keep/a").read_bytes() == b""
    assert stat.S_IMODE(os.lstat(tmp_path / "upper/keep/a").st_mode) == 0o600
    assert os.lstat(tmp_path / "upper/keep/a").st_mtime_ns == 10**9
    assert (lowers[1] / "keep/a").read_bytes() == b"a"
    assert view.lookup(walk(view, "keep"), b"a") is node


def test_copy_up_of_one_hardlink_links_its_other_names(stack, view):
    tmp_path, lowers = stack
    view.set_attributes(walk(view, "same"), AttrChange(mode=0o640))
    upper = tmp_path / "upper"
    assert os.lstat(upper / "same").st_ino == os.lstat(upper / "same-too").st_ino


def test_removals_leave_whiteouts_and_say_why_they_fail(stack, view):
    tmp_path, lowers = stack
    etc = walk(view, "etc")
    view.unlink(etc, b"passwd")
    assert (tmp_path / "upper/etc/.wh.passwd").exists()
    assert names(view, etc) == [b"hostname"]
    for call, args, code in ((view.unlink, (etc, b"passwd"), errno.ENOENT),
                             (view.rmdir, (view.root, b"keep"), errno.ENOTEMPTY),
                             (view.unlink, (view.root, b"keep"), errno.EISDIR),
                             (view.rmdir, (view.root, b"same"), errno.ENOTDIR),
                             (view.mkdir, (view.root, b".wh.x", 0o755, 0, 0), errno.EINVAL),
                             (view.mkdir, (view.root, b"n" * 256, 0o755, 0, 0), errno.ENAMETOOLONG),
                             (view.mkdir, (view.root, b"etc", 0o755, 0, 0), errno.EEXIST)):
        with pytest.raises(OSError) as raised:
            call(*args)
        assert raised.value.errno == code, call


def test_a_new_directory_over_a_deleted_lower_one_is_opaque(stack, view):
    tmp_path, lowers = stack
    keep = walk(view, "keep")
    view.unlink(keep, b"a")
    view.rmdir(view.root, b"keep")
    again = view.mkdir(view.root, b"keep", 0o755, 0, 0)
    assert names(view, again) == []
    assert (tmp_path / "upper/keep/.wh..wh..opq").exists()


def test_rename_of_a_lower_directory_moves_its_tree_and_hides_the_old_name(stack, view):
    tmp_path, lowers = stack
    held = walk(view, "keep")
    trio.run(view.rename, view.root, b"keep", view.root, b"kept", 0)
    assert held.relpath == b"kept" and view.lookup(view.root, b"kept") is held
    assert (tmp_path / "upper/kept/a").read_bytes() == b"a"
    assert (tmp_path / "upper/.wh.keep").exists()
    assert b"keep" not in view.listing(view.root)
    with pytest.raises(OSError) as raised:
        trio.run(view.rename, view.root, b"etc", view.root, b"same", 0)
    assert raised.value.errno == errno.ENOTDIR


def test_a_host_inode_number_freed_in_the_upper_is_retired(stack, view):
    tmp_path, lowers = stack
    first, fd = view.create(view.root, b"f", 0o644, os.O_WRONLY, 0, 0)
    os.close(fd)
    old_ino = first.ino
    view.unlink(view.root, b"f")
    second, fd = view.create(view.root, b"g", 0o644, os.O_WRONLY, 0, 0)
    os.close(fd)
    if os.lstat(tmp_path / "upper/g").st_ino == old_ino:
        assert second.ino != old_ino      # the host reused the number; the mount must not
    assert first.unlinked


def test_the_router_gives_each_cut_its_own_inodes_and_keeps_cuts_read_only(stack):
    tmp_path, lowers = stack
    view = open_view(tmp_path, lowers)
    router = ViewRouter(view)
    try:
        cut = router.lookup_virtual(router.layers_dir_at(view.root, b".layers"), b"1")   # the bottom layer alone
        assert isinstance(cut, MergedView)
        assert names(cut, cut.root) == [b"etc", b"keep", b"opt", b"same", b"same-too"]
        etc = cut.lookup(cut.root, b"etc")
        assert sorted(cut.listing(etc)) == [b"gone", b"passwd"]
        assert router.locate(etc.ino) == (cut, etc)
        assert router.locate(view.root.ino) == (view, view.root)
        assert etc.ino != walk(view, "etc").ino
        with pytest.raises(OSError) as raised:
            router.changing(etc.ino)
        assert raised.value.errno == errno.EROFS
        assert router.changing(view.root.ino) is view
    finally:
        router.close()
        view.close()
