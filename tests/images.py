"""Fixture images with the edge cases of the store issue, built with the project's own writer."""

from __future__ import annotations

from pathlib import Path

from unionfs.image.writer import (Device, Dir, Fifo, File, Hardlink, Opaque, Symlink, Whiteout, layer_tar,
                                  new_config, write_image)

LONG_NAME = "n" * 200
DEEP = "/".join(["deep"] * 30)

BASE = [
    Dir("etc"), File("etc/os-release", b"ID=base\n"), File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
    File("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
    Dir("bin"), File("bin/sh", b"#!shell\n", mode=0o755), Hardlink("bin/ash", "bin/sh"),
    File("bin/su", b"setuid!", mode=0o4755), Dir("tmp", mode=0o1777),
    Dir("var/lib/app"), File("var/lib/app/data", b"app data"), File("var/lib/app/cache", b"cache"),
    Dir("opt/tool"), File("opt/tool/old", b"old"), File("replaced", b"was a file"),
    Dir("dir-becomes-file"), File("dir-becomes-file/inner", b"inner"),
    Symlink("lib", "usr/lib"), Dir("usr/lib"), File("usr/lib/libc.so", b"\x7fELF"),
    Symlink("abs-link", "/etc/passwd"), Symlink("dangling", "nowhere/at/all"), Symlink("loop-a", "loop-b"),
    Symlink("loop-b", "loop-a"), File(f"long/{LONG_NAME}", b"long name"), File(f"{DEEP}/bottom", b"deep"),
    File("xattr-file", b"x", xattrs={"user.note": b"hello", "trusted.secret": b"\x00\x01binary"}),
    File("owned", b"owned", uid=1000, gid=1000, mode=0o600),
    Device("dev/null", "char", 1, 3, mode=0o666), Device("dev/sda", "block", 8, 0), Fifo("run/fifo"),
    File("sparse-ish", b"\0" * 70000 + b"end"),
]
INSTALL = [
    Dir("usr/bin"), File("usr/bin/app", b"#!app\n", mode=0o755), File("etc/app.conf", b"conf=1\n"),
    File("var/lib/app/data", b"app data v2"), Dir("opt/tool"), File("opt/tool/new", b"new"),
]
EMPTY: list = []
CHANGES = [
    Whiteout("var/lib/app/cache"), Opaque("opt/tool"), File("opt/tool/only", b"only this"),
    Whiteout("replaced"), Dir("replaced"), File("replaced/now-a-dir", b"dir now"),
    File("dir-becomes-file", b"now a file"), File("etc/os-release", b"ID=demo\n"),
    Whiteout("never-existed"), Whiteout("bin/ash"),
]
LAYERS = [BASE, INSTALL, EMPTY, CHANGES]
STEPS = ["ADD base.tar /", "RUN install app", "RUN true", "RUN rm and replace things"]


def build(out: Path, *, format: str = "docker", compression: str = "gzip", layers=None, tag="fixture:latest") -> Path:
    specs = LAYERS if layers is None else layers
    config = new_config(STEPS[: len(specs)] if layers is None else [f"step {i}" for i in range(len(specs))])
    config["config"] = {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/"}
    write_image(out, [layer_tar(spec) for spec in specs], config, format=format, repo_tag=tag,
                compression=compression)
    return out
