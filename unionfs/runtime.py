"""A toy container runtime on top of a mount: ``layermount run IMAGE [CMD ...]``.

The mount is the root; the command runs in new mount, PID, UTS and IPC
namespaces (unshare(1) makes them, so PID 1 inside is a process we control),
with /proc, a minimal /dev, the image's Env, WorkingDir and User, a hostname,
and a fresh directory bound over each declared volume.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from .errors import LayermountError, UsageError

DEVICES = ("null", "zero", "random", "urandom", "full", "tty")
HOSTNAME = "layermount"


@dataclass
class Container:
    """What runs where: everything the namespaced child needs, passed to it as JSON."""

    root: str
    argv: list[str]
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    hostname: str = HOSTNAME
    volumes: dict[str, str] = field(default_factory=dict)   # path in the container -> host dir


def container_for(config: dict, root: str, command: list[str]) -> Container:
    """Docker's rules: CMD replaces Cmd; Entrypoint stays in front."""
    runtime = config.get("config") or {}
    entrypoint = runtime.get("Entrypoint") or []
    argv = list(entrypoint) + (command or list(runtime.get("Cmd") or []))
    if not argv:
        raise UsageError("the image has no Entrypoint or Cmd: give a command after the image")
    env = list(runtime.get("Env") or [])
    if not any(item.startswith("PATH=") for item in env):
        env.append("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    return Container(root=root, argv=argv, env=env, workdir=runtime.get("WorkingDir") or "/",
                     user=runtime.get("User") or "")


def run(container: Container) -> int:
    """Run the container's command to its end; its exit code is returned."""
    if os.geteuid() != 0:
        raise LayermountError("layermount run needs root (it makes mount and PID namespaces)")
    if shutil.which("unshare") is None:
        raise LayermountError("layermount run needs unshare(1) from util-linux")
    spec = json.dumps(container.__dict__)
    command = ["unshare", "--mount", "--pid", "--uts", "--ipc", "--fork", "--propagation", "private",
               sys.executable, "-m", "unionfs.runtime", spec]
    return subprocess.run(command).returncode


def _enter(container: Container) -> None:
    """In the new namespaces (we are PID 1's parent-to-be): build /proc and /dev, chroot, exec."""
    root = container.root
    libc = ctypes.CDLL(None, use_errno=True)

    def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
        if libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                      data.encode() if data else None) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"mount {target}: {os.strerror(error)}")

    MS_BIND, MS_NOSUID, MS_NOEXEC, MS_NODEV, MS_REC = 4096, 2, 8, 4, 16384
    for directory in ("proc", "dev"):
        os.makedirs(os.path.join(root, directory), exist_ok=True)
    mount("proc", os.path.join(root, "proc"), "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
    dev = os.path.join(root, "dev")
    mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=1m")
    for name in DEVICES:
        host = f"/dev/{name}"
        if os.path.exists(host):
            open(os.path.join(dev, name), "w").close()
            mount(host, os.path.join(dev, name), None, MS_BIND)
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, link))
    for inside, host in container.volumes.items():
        target = os.path.join(root, inside.lstrip("/"))
        os.makedirs(target, exist_ok=True)
        mount(host, target, None, MS_BIND | MS_REC)
    libc.sethostname(container.hostname.encode(), len(container.hostname))
    os.chroot(root)
    os.chdir(container.workdir if os.path.isdir(container.workdir) else "/")
    uid, gid, groups = _resolve_user(container.user)
    env = dict(item.split("=", 1) for item in container.env if "=" in item)
    env.setdefault("HOSTNAME", container.hostname)
    env.setdefault("HOME", "/root" if uid == 0 else "/")
    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    try:
        os.execvpe(container.argv[0], container.argv, env)
    except FileNotFoundError:
        print(f"layermount: {container.argv[0]}: not found in the image", file=sys.stderr)
        raise SystemExit(127)
    except PermissionError:
        print(f"layermount: {container.argv[0]}: permission denied", file=sys.stderr)
        raise SystemExit(126)


def _resolve_user(user: str) -> tuple[int, int, list[int]]:
    """``User`` as Docker reads it: name or uid, optional :group, looked up in the image's files."""
    if not user:
        return 0, 0, []
    name, _, group = user.partition(":")
    passwd = _table("/etc/passwd")
    entry = next((row for row in passwd if row[0] == name or row[2] == name), None)
    if entry is not None:
        uid, gid = int(entry[2]), int(entry[3])
    elif name.isdigit():
        uid, gid = int(name), int(name)
    else:
        raise SystemExit(f"layermount: user {name!r} is not in the image's /etc/passwd")
    if group:
        row = next((row for row in _table("/etc/group") if row[0] == group or row[2] == group), None)
        gid = int(row[2]) if row else int(group) if group.isdigit() else gid
    return uid, gid, [gid]


def _table(path: str) -> list[list[str]]:
    try:
        with open(path) as handle:
            return [line.rstrip("\n").split(":") for line in handle if line.count(":") >= 3]
    except OSError:
        return []


def fresh_volumes(config: dict) -> tuple[dict[str, str], str | None]:
    """A temporary host dir for each declared volume, as Docker's anonymous volumes."""
    volumes = sorted((config.get("config") or {}).get("Volumes") or {})
    if not volumes:
        return {}, None
    base = tempfile.mkdtemp(prefix="layermount-volumes-")
    made = {}
    for index, path in enumerate(volumes):
        host = os.path.join(base, str(index))
        os.mkdir(host)
        made[path] = host
    return made, base


if __name__ == "__main__":
    _enter(Container(**json.loads(sys.argv[1])))
