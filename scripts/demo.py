"""The story of layers, on three small images that share a base layer.

Everything happens in a temporary directory (its own store included) that is
removed at the end; the mounts are always unmounted, even on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from unionfs.image.writer import Dir, File, Symlink, Whiteout, layer_tar, new_config, write_image

LAYERMOUNT = [sys.executable, "-m", "unionfs"]

BASE = [Dir("etc"), File("etc/os-release", b'NAME="Demo Linux"\nVERSION_ID=1\n'),
        File("etc/motd", b"Welcome to the demo base layer.\n"), Dir("bin"),
        File("bin/greet", b"#!/bin/sh\necho hello from the base layer\n", mode=0o755),
        Dir("usr/share/doc"), File("usr/share/doc/README", b"base documentation\n"),
        Dir("tmp", mode=0o1777), Symlink("lib", "usr/lib"), Dir("usr/lib")]
INSTALL_WEB = [Dir("usr/sbin"), File("usr/sbin/webserver", b"#!/bin/sh\necho serving\n", mode=0o755),
               Dir("etc/web"), File("etc/web/site.conf", b"listen 80\n")]
TIDY_UP = [Whiteout("usr/share/doc/README"), File("etc/motd", b"Welcome to the web image.\n")]
INSTALL_DB = [Dir("usr/sbin"), File("usr/sbin/database", b"#!/bin/sh\necho storing\n", mode=0o755)]


def title(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}")


def run(*args, show: bool = True) -> str:
    printable = " ".join(str(a) for a in args).replace(sys.executable + " -m unionfs", "layermount")
    if show:
        print(f"$ {printable}")
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    output = result.stdout + result.stderr
    if show and output:
        print(output.rstrip())
    if result.returncode not in (0, 1):
        raise SystemExit(f"demo: step failed: {printable}")
    return output


def layermount(*args, show: bool = True) -> str:
    return run(*LAYERMOUNT, *args, show=show)


def build_images(work: Path) -> dict[str, Path]:
    base = layer_tar(BASE)
    made = {}
    for name, layers, steps in [
        ("web", [base, layer_tar(INSTALL_WEB), layer_tar(TIDY_UP)],
         ["ADD rootfs.tar /", "RUN install webserver", "RUN rm README && edit motd"]),
        ("db", [base, layer_tar(INSTALL_DB)], ["ADD rootfs.tar /", "RUN install database"]),
        ("base", [base], ["ADD rootfs.tar /"]),
    ]:
        config = new_config(steps)
        config["config"] = {"Cmd": ["/bin/greet"], "Env": ["PATH=/usr/sbin:/bin"]}
        made[name] = work / f"{name}.tar"
        write_image(made[name], layers, config, repo_tag=f"demo/{name}:latest", compression="gzip")
    return made


def main() -> None:
    if os.geteuid() != 0:
        print("demo: run as root (it mounts FUSE filesystems and writes a layer store)", file=sys.stderr)
        raise SystemExit(1)
    work = Path(tempfile.mkdtemp(prefix="layermount-demo-"))
    store = work / "store"
    mounted: list[Path] = []
    try:
        images = build_images(work)
        title("1. Three images, one shared base layer")
        for name, path in images.items():
            print(f"{path.name}: built ({path.stat().st_size} bytes)")
        layermount("inspect", images["web"])

        title("2. Mount the web image: every layer is unpacked into the store")
        web = work / "web-root"
        web.mkdir()
        layermount(images["web"], web, "--store", store, "--upper", work / "web-upper")
        mounted.append(web)
        run("ls", "-l", web)
        run("cat", web / "etc/motd")

        title("3. Mount the db image: the base layer already exists, only the new layer is unpacked")
        db = work / "db-root"
        db.mkdir()
        layermount(images["db"], db, "--store", store, "--read-only")
        mounted.append(db)
        run("ls", db / "usr/sbin")
        layermount("store", "ls", "--store", store)

        title("4. Where does a file come from? (provenance)")
        layermount("which", web / "etc/motd")
        run("getfattr", "-n", "user.layermount.layer", web / "usr/sbin/webserver")
        layermount("which", web / "usr/share/doc/README")

        layermount("explain", web / "usr/share/doc/README")

        title("4b. Time travel: /.layers/N is the root as it stood after build step N")
        run("ls", web / ".layers")
        run("diff", "-r", "--no-dereference", web / ".layers/2", web / ".layers/3")

        title("5. Copy-on-write: edit a base file, delete another")
        print(f"$ echo 'edited in the container' >> {web}/etc/os-release")
        with open(web / "etc/os-release", "a") as handle:
            handle.write("edited in the container\n")
        run("rm", web / "bin/greet")
        layermount("which", web / "etc/os-release")
        layermount("diff", web)
        print("The upper layer holds the copy and a whiteout for the deletion:")
        run("find", work / "web-upper/diff", "-printf", "%y %p\n")
        print("The shared base layer in the store is untouched:")
        run("cat", *[p for p in store.glob("layers/*/diff/etc/os-release")])

        title("6. Commit: the change becomes one new layer on top")
        layermount("umount", web)
        mounted.remove(web)
        layermount("commit", images["web"], work / "web-upper", "-o", work / "web-v2.tar",
                   "-m", "RUN edit os-release && rm greet")
        layermount("history", work / "web-v2.tar", "--store", store)
        v2 = work / "v2-root"
        v2.mkdir()
        layermount(work / "web-v2.tar", v2, "--store", store, "--read-only")
        mounted.append(v2)
        run("cat", v2 / "etc/os-release")
        layermount("store", "ls", "--store", store)
    finally:
        for point in reversed(mounted):
            layermount("umount", point, show=False)
        shutil.rmtree(work, ignore_errors=True)
    title("Done: everything was unmounted and the demo directory removed")


if __name__ == "__main__":
    main()
