"""The importable API: the README's example runs as written, and nothing in the library prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import images
import pytest

from conftest import fuse_missing
from unionfs.mount import is_mounted

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def fuse():
    missing = fuse_missing()
    if missing:
        pytest.skip(missing)


def test_readme_example_runs_mounts_diffs_commits_and_unmounts(fuse, tmp_path):
    images.build(tmp_path / "image.tar", layers=[images.BASE, images.INSTALL])
    (tmp_path / "rootfs").mkdir()
    env = dict(os.environ, LAYERMOUNT_STORE=str(tmp_path / "store"),
               PYTHONPATH=os.pathsep.join([str(README.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", readme_example()], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(str(tmp_path / "rootfs"))
    lines = result.stdout.splitlines()
    assert lines[0] == "['fixture:latest'] 2"
    assert "C /etc" in lines and "A /etc/motd" in lines
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", lines[-1])
    from unionfs import open_image
    committed = open_image(tmp_path / "image-v2.tar")
    assert len(committed.layers) == 3 and committed.id == lines[-1]
    assert result.stderr == ""          # the library prints nothing of its own


def test_mounted_unmounts_when_the_block_raises(fuse, tmp_path, monkeypatch):
    import unionfs

    monkeypatch.setenv("LAYERMOUNT_STORE", str(tmp_path / "store"))
    image = images.build(tmp_path / "image.tar", layers=[images.BASE])
    root = tmp_path / "root"
    root.mkdir()
    code = f"""
import unionfs
try:
    with unionfs.mounted({str(image)!r}, {str(root)!r}, read_only=True) as m:
        assert open(m.mountpoint + "/etc/os-release").read() == "ID=base\\n"
        open(m.mountpoint + "/new", "w")
except OSError as exc:
    print(exc.errno)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, PYTHONPATH=str(README.parent)))
    assert result.stdout.strip() == "30", result.stderr        # EROFS, raised out of the block
    assert not is_mounted(str(root))
    assert unionfs.diff  # the lazy export resolves


def test_library_surface_is_typed_and_lazy():
    """``import unionfs`` loads none of the library (the mount daemon's start-up stays lean)."""
    code = ("import sys, unionfs; assert 'unionfs.library' not in sys.modules; "
            "assert all(getattr(unionfs, name) for name in unionfs.__all__); "
            "print(unionfs.mounted.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(README.parent)))
    assert result.stdout.strip() == "unionfs.library", result.stderr
    assert (README.parent / "unionfs" / "py.typed").exists()
    with pytest.raises(AttributeError):
        import unionfs
        unionfs.no_such_thing


def test_library_errors_are_the_clis(tmp_path):
    import unionfs
    from unionfs.errors import ImageError

    with pytest.raises(ImageError) as caught:
        unionfs.open_image(tmp_path / "missing.tar")
    assert caught.value.exit_code == 3 and "missing.tar" in str(caught.value)
