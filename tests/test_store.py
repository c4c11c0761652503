"""The tree walk and removal (unionfs.fstree) and the store's own housekeeping, without FUSE."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest

from unionfs import fstree
from unionfs.store import LayerStore


def nested(root_fd: int, depth: int, name: str = "d") -> None:
    current = os.dup(root_fd)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=current)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = child
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=current))
    finally:
        os.close(current)


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "b/inner").mkdir(parents=True)
    (root / "a").write_text("a")
    (root / "b/inner/file").write_text("f")
    (root / "b/link").symlink_to(tmp_path)            # must never be followed
    os.mkfifo(root / "fifo")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield root, fd
    finally:
        os.close(fd)
        subprocess.run(["rm", "-rf", str(root)])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_walk_lists_parents_first_sorted_and_never_follows_symlinks(tree):
    _, fd = tree
    seen = [(entry.relpath, entry.is_dir, entry.fd is not None) for entry in fstree.walk(fd)]
    assert seen == [("a", False, False), ("b", True, True), ("b/inner", True, True), ("b/inner/file", False, False),
                    ("b/link", False, False), ("fifo", False, False)]


def test_walk_of_a_tree_2000_deep_holds_a_bounded_number_of_fds(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        nested(fd, 2000)
        before = open_fds()
        most, count = 0, 0
        for entry in fstree.walk(fd):
            count += 1
            if count % 250 == 0:
                most = max(most, open_fds() - before)
        assert count == 2001 and most <= fstree.KEPT_FDS + 2
        assert open_fds() == before
    finally:
        os.close(fd)
        fstree.remove_tree(root)
    assert not root.exists()


def test_walk_notices_a_directory_moved_below_the_fds_it_keeps(tmp_path):
    """Deeper than KEPT_FDS the walk closes the shallow fds and climbs back to them through "..":
    a shallow directory moved meanwhile (so ".." is elsewhere) is caught, not walked into."""
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        nested(fd, fstree.KEPT_FDS + 10)
        moved = False
        with pytest.raises(fstree.TreeChanged):
            for entry in fstree.walk(fd):
                if entry.name == "leaf" and not moved:
                    os.rename(os.path.join(root, *["d"] * 5), root / "elsewhere")
                    moved = True
    finally:
        os.close(fd)
        fstree.remove_tree(root)


def test_walk_refuses_a_directory_swapped_for_a_symlink_before_it_is_entered(tree, tmp_path):
    root, fd = tree
    walk = fstree.walk(fd)
    assert next(walk).name == "a"
    os.rename(root / "b", tmp_path / "b-away")
    (root / "b").symlink_to(tmp_path / "b-away")
    # "b" was listed as a name; its lstat now says symlink, so it is an entry, not a directory to enter.
    rest = [entry.relpath for entry in walk]
    assert rest == ["b", "fifo"]


def test_remove_tree_never_follows_a_symlink_and_tolerates_a_missing_path(tree, tmp_path):
    root, _ = tree
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("keep")
    fstree.remove_tree(root)
    assert not root.exists() and sentinel.read_text() == "keep"
    fstree.remove_tree(root)          # gone already: nothing to do


def test_remove_tree_as_an_unprivileged_owner_of_read_only_and_closed_directories(tmp_path):
    """What an unprivileged unpack leaves (0555 and 0000 directories) goes, as rmtree's onerror did."""
    base = tmp_path / "base"
    base.mkdir()
    os.chown(base, 65534, 65534)
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.mkdir("top", dir_fd=fd)
            top = os.open("top", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            nested(top, 1200)
            os.mkdir("closed", dir_fd=top)
            inner = os.open("closed", os.O_RDONLY | os.O_DIRECTORY, dir_fd=top)
            os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=inner))
            os.fchmod(inner, 0)
            os.fchmod(top, 0o555)
            os.close(inner)
            os.close(top)
            fstree.remove_tree_at(fd, "top")
            code = 0 if os.listdir(fd) == [] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert os.listdir(base) == []


def test_the_store_and_its_parts_are_private(tmp_path):
    store = LayerStore(tmp_path / "store").ensure()
    for path in (store.root, store.layers_dir, store.images_dir, store.blobs_dir, store.tmp_dir, store.locks_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    scratch, lock = store.scratch_upper()
    try:
        assert stat.S_IMODE(os.stat(scratch).st_mode) == 0o700
        assert stat.S_IMODE(os.fstat(lock).st_mode) == 0o600
    finally:
        os.close(lock)


def test_a_store_of_another_user_is_refused(tmp_path):
    root = tmp_path / "theirs"
    root.mkdir()
    os.chown(root, 65534, 65534)
    from unionfs.errors import StoreError

    with pytest.raises(StoreError, match="owned by uid 65534"):
        LayerStore(root).ensure()


def test_every_lock_file_is_private(tmp_path):
    store = LayerStore(tmp_path / "store").ensure()
    held = store.hold_layers(["sha256:" + "ab" * 32])
    with store._lock("exclusive"), store._try_lock("tried"):
        pass
    os.close(held[0])
    locks = sorted(store.locks_dir.iterdir())
    assert [p.name for p in locks] == ["ab" * 32 + ".lock", "exclusive.lock", "tried.lock"]
    for path in locks:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.parametrize("damage", ['{"diff_id": "sha256:x"}', '[]', '{"size": "9"', ""])
def test_a_damaged_layer_json_is_a_store_error_naming_the_layer(tmp_path, damage):
    from unionfs.errors import StoreError

    store = LayerStore(tmp_path / "store").ensure()
    layer_dir = store.layers_dir / ("cd" * 32)
    (layer_dir / "diff").mkdir(parents=True)
    (layer_dir / "layer.json").write_text(damage)
    with pytest.raises(StoreError, match=r"layer cdcdcdcdcdcd is damaged: .*\S") as caught:
        store.layer("sha256:" + "cd" * 32)
    assert "\n" not in str(caught.value)
