"""The library behind the CLI: open an image, unpack it into the store, mount it, explain a path."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

from .errors import ImageError, MountError, UsageError
from .layerform import OCI, OVERLAY, STACK_XATTR
from .mount import FSTYPE, MountOptions, mount, mount_entries, mount_owner
from .mountopts import ViewOptions
from .overlay import Layer, MergedView, UpperLayer, layers_from_store
from .progress import PullProgress
from .textsafe import shown

if TYPE_CHECKING:
    from .image.model import Image
    from .store import LayerStore, StoredLayer


def load_image(sources: list[str], *, platform: str | None = None, ref: str | None = None,
               registry=None) -> Image:
    """One argument is an image (docker-archive, OCI, or a registry REF); several are plain layer tars,
    bottom first. ``registry`` (RegistryOptions) says how to reach registries."""
    # Imported here, like the store below: mounting plain directories needs neither,
    # and the daemon's start-up time is part of every mount.
    from .image import open_image, open_layer_tars

    if not sources:
        raise UsageError("no image given")
    if len(sources) == 1:
        return open_image(sources[0], platform=platform, ref=ref, registry=registry)
    return open_layer_tars(sources)


def recorded_image(store: "LayerStore", source: str) -> Image | None:
    """The image the store pulled for registry reference ``source``, if all its layers are still there."""
    from .image.model import Image as ImageModel, LayerRef
    from .image.reference import parse_source

    try:
        ref = parse_source(source).registry
    except UsageError:
        return None
    if ref is None or not store.root.is_dir():
        return None
    wanted = f"{ref.name}@{ref.digest}" if ref.digest else f"{ref.name}:{ref.tag}"
    records = [record for record in store.images() if record.get("format") == "registry"
               and wanted in record.get("repo_tags", []) + record.get("repo_digests", [])]
    if not records:
        return None
    record = max(records, key=lambda record: record.get("recorded_at", 0))
    if any(store.layer(diff_id) is None for diff_id in record["layers"]):
        return None

    def not_needed():
        raise ImageError(f"{source}: layer not in the store any more")
    layers = [LayerRef(name=diff_id, open=not_needed, diff_id=diff_id, remote=True) for diff_id in record["layers"]]
    return ImageModel(source=str(ref), layers=layers, config=record.get("config") or {}, config_digest=record["id"],
                      repo_tags=record.get("repo_tags", []), repo_digests=record.get("repo_digests", []),
                      format="registry", origin=ref.name)


def unpack(image: Image, store: "LayerStore", progress=None, jobs: int | None = None) -> list["StoredLayer"]:
    """``jobs`` layers at once: by default one per core, and for a registry 3, as docker pulls."""
    progress = progress or PullProgress(quiet=True)
    if image.format == "registry":
        from .image.registry import DEFAULT_JOBS
        from .store import short_id

        jobs = jobs or DEFAULT_JOBS
        # docker pull's opening: every layer's state at once, before the downloads start.
        missing = 0
        for ref in image.layers:
            stored = store.layer(ref.diff_id) if store.layers_dir.is_dir() else None
            if stored is not None:
                progress(short_id(ref.diff_id), "Already exists", stored.size, stored.size)
            else:
                progress(short_id(ref.diff_id), "Pulling fs layer" if missing < jobs else "Waiting", 0, ref.size)
                missing += 1
    return store.unpack_image(image, progress, jobs=jobs)


def mount_image(image: Image, store: "LayerStore", options: MountOptions, progress=None,
                upper_dir: str | None = None, view_options: ViewOptions | None = None, *,
                upper_shared: bool = False, jobs: int | None = None) -> int:
    """Unpack what is missing, then mount; returns the daemon pid once the mount is ready.

    Writable unless ``options.read_only``: into ``upper_dir`` (kept, reusable) or
    into a throw-away upper in the store that goes with the unmount.
    """
    stored = unpack(image, store, progress, jobs)
    held = store.hold_layers([layer.diff_id for layer in stored])
    cleanup = None
    upper = None
    try:
        if not options.read_only:
            if upper_dir is None:
                upper_dir, held_upper = store.scratch_upper()
                held.append(held_upper)
                scratch = upper_dir
                cleanup = lambda: remove_tree(Path(scratch))  # noqa: E731 - runs in the daemon
            upper = prepare_upper(upper_dir, image=image, layers=stored, store=store, shared=upper_shared)

        def open_view() -> MergedView:
            return MergedView(layers_from_store(stored), _open_upper(upper, OCI) if upper else None,
                              options=view_options)
        return mount(open_view, options, cleanup=cleanup)
    finally:
        for fd in held:
            os.close(fd)


def prepare_upper(path: str, *, image: Image, layers, store, shared: bool = False) -> tuple[str, str]:
    """A kept upper is a directory holding ``diff/`` (the layer), ``work/`` and what it sits on.

    ``DIR`` is made 0700 and must stay out of other users' reach (unless
    ``shared``): copy-up puts the image's setuid-root files and devices in
    ``DIR/diff``, where no nosuid,nodev applies. ``diff`` itself keeps 0755,
    as it is the root directory the mount serves.
    """
    root = Path(path)
    if not shared:
        _refuse_reachable_upper(root)
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "diff").mkdir(mode=0o755, exist_ok=True)
        (root / "work").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"upper {path}: cannot create it: {exc.strerror}") from None
    if not shared:
        _refuse_reachable_upper(root)
    record = root / "layermount.json"
    source = image.source if image.format == "registry" else os.path.abspath(image.source)
    info = {"image": source, "image_id": image.id, "store": str(store.root),
            "layers": [layer.diff_id for layer in layers]}
    if record.exists():
        previous = read_upper_record(record, path)
        if previous.get("layers") != info["layers"]:
            raise UsageError(f"upper {path}: was made on another image ({previous.get('image')})")
    else:
        record.write_text(json.dumps(info, indent=1))
    return str(root / "diff"), str(root / "work")


def read_upper_record(record: Path, upper: str) -> dict:
    """An upper's layermount.json, checked: anyone who could write the upper could have edited it."""
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UsageError(f"upper {upper}: cannot read {record.name}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    if (not isinstance(info, dict) or not all(isinstance(info.get(key), str) for key in ("image", "store"))
            or not isinstance(info.get("layers"), list) or not all(isinstance(layer, str) for layer in info["layers"])
            or not isinstance(info.get("image_id", ""), str)):
        raise UsageError(f"upper {upper}: {record.name} is damaged (not the record layermount writes)")
    return info


def _refuse_reachable_upper(root: Path) -> None:
    """Refuse an upper another user could reach into, now or later.

    Reaching ``DIR/diff/x`` takes search permission on every directory of the
    path. So ``DIR`` must be searchable by its owner only, and owned by this
    user or root (an owner can chmod it); every directory above must be owned
    by this user or root and writable by nobody else unless sticky, or
    another user could move ``DIR`` away and put a directory of theirs, or a
    symlink to one, in its place before the next mount.
    """
    from .errors import StoreError

    me = os.geteuid()
    hint = "make it private (chmod 700) or pass --upper-shared"
    real = Path(os.path.realpath(root))
    for directory in [*reversed(real.parents)] + [real]:
        try:
            st = os.stat(directory)
        except FileNotFoundError:
            break
        mode = stat.S_IMODE(st.st_mode)
        if st.st_uid not in (0, me):
            raise StoreError(f"upper {root}: {directory} belongs to uid {st.st_uid}, who can reach into it; {hint}")
        if directory == real:
            if mode & 0o033:
                raise StoreError(f"upper {root}: mode {mode:04o} lets other users reach into it (a copy-up puts "
                                 f"setuid files and devices there, outside the mount's nosuid,nodev); {hint}")
            for inner in ("diff", "work"):
                with contextlib.suppress(FileNotFoundError):
                    owner = os.lstat(directory / inner).st_uid
                    if owner not in (0, me):
                        raise StoreError(f"upper {root}: {inner} belongs to uid {owner}; {hint}")
        elif mode & 0o022 and not mode & stat.S_ISVTX:
            raise StoreError(f"upper {root}: {directory} is writable by other users, who could swap the upper "
                             f"for their own; {hint}")


def _open_upper(upper: tuple[str, str], whiteout_form: str):
    try:
        return UpperLayer(upper[0], upper[1], whiteout_form)
    except OSError as exc:
        raise UsageError(f"upper {upper[0]}: {exc.strerror}") from None


def mount_lowerdirs(lowerdirs: list[str], options: MountOptions, upperdir: str | None = None,
                    workdir: str | None = None, whiteout_form: str = OVERLAY,
                    view_options: ViewOptions | None = None) -> int:
    """Mount plain layer directories, top first, as kernel overlayfs' lowerdir= takes them."""
    for kind, path in [("lowerdir", p) for p in lowerdirs] + [("upperdir", upperdir), ("workdir", workdir)]:
        if path is not None and not os.path.isdir(path):
            raise UsageError(f"{kind} {path}: not a directory")
    if (upperdir is None) != (workdir is None):
        raise UsageError("upperdir= and workdir= go together")
    options.read_only = options.read_only or upperdir is None

    def open_view() -> MergedView:
        upper = _open_upper((upperdir, workdir), whiteout_form) if upperdir and not options.read_only else None
        return MergedView([Layer.open(path) for path in lowerdirs], upper, options=view_options)
    return mount(open_view, options)


# ---- provenance ---------------------------------------------------------------

def find_mount(path: str) -> tuple[str, str]:
    """(mountpoint, path inside it) of the layermount mount that holds ``path``."""
    real = os.path.realpath(os.path.abspath(path)) if os.path.lexists(path) else os.path.abspath(path)
    candidates = [point for point, kind in mount_entries() if kind == FSTYPE]
    best = None
    for point in candidates:
        if real == point or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) > len(best):
                best = point
    if best is None:
        raise UsageError(f"{path}: not inside a layermount mount")
    inside = os.path.relpath(real, best)
    return best, "" if inside == "." else inside


def mount_stack(mountpoint: str) -> list[dict]:
    """The layers of a mount, top first, as its daemon tells them.

    Only a mount of this user's or root's is asked: anyone can run a FUSE
    daemon that calls itself layermount and names root-only directories as
    its layers, for root's ``commit`` to tar.
    """
    owner = mount_owner(mountpoint)
    if owner not in (0, os.geteuid()):
        who = "nobody known" if owner is None else f"uid {owner}"
        raise MountError(f"{mountpoint}: mounted by {who}, not by you or root: its word on its layers is not "
                         f"trusted (give the upper directory itself)")
    try:
        stack = json.loads(os.getxattr(mountpoint, STACK_XATTR.decode()))
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot ask the daemon for its layers: {exc.strerror}") from None
    except ValueError:
        raise MountError(f"{mountpoint}: the daemon's list of layers is not JSON") from None
    if not isinstance(stack, list) or not all(isinstance(entry, dict) and isinstance(entry.get("name"), str)
                                              and isinstance(entry.get("path"), str) for entry in stack):
        raise MountError(f"{mountpoint}: the daemon's list of layers is malformed")
    return stack


def remove_tree(path: Path) -> None:
    from .fstree import remove_tree as remove

    remove(path)


def store_for(path: str | None) -> "LayerStore":
    from .store import LayerStore

    return LayerStore(Path(path) if path else None)


def image_summary(image: Image) -> dict:
    """What ``inspect`` shows: platform, layers with digests and their build steps, runtime config."""
    if not image.layers:
        raise ImageError(f"{image.source}: image has no layers")
    history = image.history()
    layer_steps = [entry for entry in history if not entry.get("empty_layer")]
    config = image.config.get("config") or {}
    layers = []
    for index, ref in enumerate(image.layers):
        step = layer_steps[index] if index < len(layer_steps) else {}
        layers.append({"index": index + 1, "digest": ref.digest, "diff_id": ref.diff_id, "size": ref.size,
                       "media_type": ref.media_type, "created_by": step.get("created_by", ""),
                       "created": step.get("created", "")})
    return {
        "source": image.source, "format": image.format, "id": image.id, "repo_tags": image.repo_tags,
        "repo_digests": image.repo_digests,
        "platform": image.platform, "created": image.config.get("created"), "layers": layers,
        "history": history,
        "config": {key: config.get(key) for key in
                   ("Env", "Cmd", "Entrypoint", "WorkingDir", "ExposedPorts", "Volumes", "User", "Labels")},
    }


# ---- what an upper changed --------------------------------------------------------

@dataclass
class UpperInfo:
    """An upper directory and the lower layers (top first) it sits on."""

    upper: str
    lowers: list[str]
    record: dict


def locate_upper(target: str, lowerdir: str | None = None) -> UpperInfo:
    """Find the upper and its lowers from a mountpoint, a kept --upper dir, or a raw upperdir + lowerdir."""
    real = os.path.realpath(target)
    if any(point == real and kind == FSTYPE for point, kind in mount_entries()):
        stack = mount_stack(real)
        uppers = [entry["path"] for entry in stack if entry["name"] == "upper"]
        if not uppers:
            raise UsageError(f"{target}: a read-only mount has no upper layer")
        return UpperInfo(uppers[0], [entry["path"] for entry in stack if entry["name"] != "upper"], {})
    root = Path(real)
    if root.name == "diff" and (root.parent / "layermount.json").exists():
        root = root.parent
    record_path = root / "layermount.json"
    if record_path.exists():
        record = read_upper_record(record_path, target)
        store = store_for(record["store"])
        lowers = []
        for diff_id in reversed(record["layers"]):
            layer = store.layer(diff_id)
            if layer is None:
                raise UsageError(f"{target}: its layer {diff_id[:19]} is no longer in store {store.root}")
            lowers.append(str(layer.path))
        return UpperInfo(str(root / "diff"), lowers, record)
    if not root.is_dir():
        raise UsageError(f"{target}: not a mountpoint, an upper directory or a directory at all")
    lowers = [path for path in (lowerdir or "").split(":") if path]
    return UpperInfo(str(root), lowers, {})


def commit(image: Image, upper: UpperInfo, out: str, *, message: str | None = None, image_format: str = "docker",
           tag: str | None = None) -> str:
    """Write a new image: ``image`` with the upper appended as one more layer; return its id."""
    from .diff import write_layer_tar
    from .image.compression import open_decompressed
    from .image.writer import write_image

    if upper.record.get("image_id") not in (None, image.id):
        raise UsageError(f"upper {upper.upper} was made on image {upper.record.get('image')}, not {image.source}")
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise UsageError(f"{out}: directory {out_dir} does not exist")
    # The new image holds all the old one does and the upper's files: no wider than the
    # image it came from, and the caller's umask on top. Directories (oci-dir) get x where r.
    mode = _commit_mode(image.source)
    old_umask = os.umask(0o777 & ~(mode | (mode & 0o444) >> 2))
    try:
        with tempfile.TemporaryDirectory(prefix=".layermount-commit-", dir=out_dir) as scratch:
            layer_files = []
            for index, ref in enumerate(image.layers):
                path = os.path.join(scratch, f"layer{index}.tar")
                with ref.open() as blob, open(path, "wb") as tar_file:
                    shutil.copyfileobj(open_decompressed(blob), tar_file, 1 << 20)
                layer_files.append(path)
            new_layer = os.path.join(scratch, "upper.tar")
            with open(new_layer, "wb") as tar_file:
                write_layer_tar(upper.upper, tar_file)
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            config = copy.deepcopy(image.config)
            config["created"] = now
            config.setdefault("history", []).append(
                {"created": now, "created_by": message or "layermount commit", "comment": "layermount commit"})
            return write_image(out, layer_files + [new_layer], config, format=image_format, repo_tag=tag)
    finally:
        os.umask(old_umask)


def _commit_mode(source: str) -> int:
    """Permission bits for a committed image: the caller's umask, and never more than ``source`` has."""
    umask = os.umask(0o077)
    os.umask(umask)
    try:
        source_mode = stat.S_IMODE(os.stat(source).st_mode)
    except (OSError, TypeError, ValueError):
        source_mode = 0o600
    return 0o666 & ~umask & source_mode | 0o600 & ~umask


def commit_push(image: Image, upper: UpperInfo, destination, options, *, message: str | None = None,
                say=lambda line: None) -> str:
    """Push ``image`` plus the upper as one more (gzip) layer to ``destination``; return the manifest digest.

    The base layers go as the blobs they already are, so a registry that has
    them (or can mount them from the image's own repository) gets only the new one.
    """
    import hashlib
    import zlib

    from .diff import write_layer_tar
    from .image.model import Image as ImageModel, LayerRef
    from .image.oci_layout import OCI_LAYER
    from .image.registry import push_image

    if upper.record.get("image_id") not in (None, image.id):
        raise UsageError(f"upper {upper.upper} was made on image {upper.record.get('image')}, not {image.source}")
    with tempfile.TemporaryDirectory(prefix="layermount-push-") as scratch:
        tar_path, blob_path = os.path.join(scratch, "upper.tar"), os.path.join(scratch, "upper.tar.gz")
        with open(tar_path, "wb") as tar_file:
            write_layer_tar(upper.upper, tar_file)
        diff_id, digest = hashlib.sha256(), hashlib.sha256()
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
        with open(tar_path, "rb") as tar_file, open(blob_path, "wb") as blob_file:
            while data := tar_file.read(1 << 20):
                diff_id.update(data)
                piece = compressor.compress(data)
                digest.update(piece)
                blob_file.write(piece)
            piece = compressor.flush()
            digest.update(piece)
            blob_file.write(piece)
        new_layer = LayerRef(name="upper", open=lambda: open(blob_path, "rb"), digest="sha256:" + digest.hexdigest(),
                             diff_id="sha256:" + diff_id.hexdigest(), size=os.path.getsize(blob_path),
                             media_type=OCI_LAYER + "+gzip")
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        config = copy.deepcopy(image.config)
        config["created"] = now
        config.setdefault("history", []).append(
            {"created": now, "created_by": message or "layermount commit", "comment": "layermount commit"})
        config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        config["rootfs"]["diff_ids"] = [layer.diff_id for layer in image.layers] + [new_layer.diff_id]
        committed = ImageModel(source=image.source, layers=[*image.layers, new_layer], config=config,
                               format=image.format, origin=image.origin)
        return push_image(committed, destination, options, say)


@dataclass
class HistoryStep:
    """One build step of an image, as ``docker history`` shows it."""

    diff_id: str | None        # None for a step that made no layer (ENV, CMD, EXPOSE ...)
    created: str
    created_by: str
    size: int | None
    in_store: bool | None


def history(image: Image, store: "LayerStore") -> list[HistoryStep]:
    """The build steps, top first; each layer step says whether the store already has it."""
    steps = []
    layers = iter(image.layers)
    entries = image.history() or [{} for _ in image.layers]
    for entry in entries:
        if entry.get("empty_layer"):
            steps.append(HistoryStep(None, entry.get("created", ""), entry.get("created_by", ""), 0, None))
            continue
        ref = next(layers, None)
        if ref is None:
            break
        stored = store.layer(ref.diff_id) if ref.diff_id else None
        size = stored.size if stored is not None else ref.size
        steps.append(HistoryStep(ref.diff_id or ref.digest, entry.get("created", ""), entry.get("created_by", ""),
                                 size, stored is not None))
    for ref in layers:   # more layers than history entries: still show them
        steps.append(HistoryStep(ref.diff_id or ref.digest, "", "", ref.size, None))
    return list(reversed(steps))


def run_image(image: Image, store: "LayerStore", command: list[str], *, upper_dir: str | None = None,
              network: str = "none", progress=None, jobs: int | None = None) -> int:
    """Mount the image, run ``command`` (or its Entrypoint + Cmd) inside, unmount; return the exit code."""
    from .mount import unmount
    from .runtime import container_for, fresh_volumes, run

    container = container_for(image.config, "", command)
    container.network = network
    # The mountpoint sits in a 0700 directory of its own: the container gets in through the
    # pivot, no other host user can walk to it, whatever the mount's allow_other says.
    private = tempfile.mkdtemp(prefix="layermount-run-")
    mountpoint = os.path.join(private, "root")
    os.mkdir(mountpoint, 0o700)
    volumes_base = None
    try:
        # FUSE lets only the mounting user in unless allow_other: needed when the image runs as another.
        user = container.user.split(":")[0]
        options = MountOptions(mountpoint=mountpoint, allow_other=user not in ("", "root", "0"))
        container.volumes, volumes_base = fresh_volumes(image.config)
        mount_image(image, store, options, progress, upper_dir, jobs=jobs)
        try:
            container.root = mountpoint
            for inside in container.volumes:
                print(f"layermount: volume {shown(inside)} is a fresh temporary directory; writes there "
                      f"do not go to the upper layer", file=sys.stderr)
            return run(container)
        finally:
            unmount(mountpoint)
    finally:
        if volumes_base is not None:
            with contextlib.suppress(OSError):     # what the container left, however deep
                remove_tree(Path(volumes_base))
        for directory in (mountpoint, private):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
