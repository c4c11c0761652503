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

from . import safepath
from .errors import ImageError, MountError, UsageError
from .mount import FSTYPE, MountOptions, mount, mount_entries
from .overlay import STACK_XATTR, Layer, MergedView, layers_from_store
from .progress import PullProgress
from .upper import OCI, OVERLAY, UpperLayer
from .whiteout import OPAQUE_MARKER, whiteout_name

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
                upper_dir: str | None = None, jobs: int | None = None) -> int:
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
            upper = prepare_upper(upper_dir, image=image, layers=stored, store=store)

        def open_view() -> MergedView:
            return MergedView(layers_from_store(stored), _open_upper(upper, OCI) if upper else None)
        return mount(open_view, options, cleanup=cleanup)
    finally:
        for fd in held:
            os.close(fd)


def prepare_upper(path: str, *, image: Image, layers, store) -> tuple[str, str]:
    """A kept upper is a directory holding ``diff/`` (the layer), ``work/`` and what it sits on."""
    root = Path(path)
    try:
        (root / "diff").mkdir(parents=True, exist_ok=True)
        (root / "work").mkdir(exist_ok=True)
    except OSError as exc:
        raise UsageError(f"upper {path}: cannot create it: {exc.strerror}") from None
    record = root / "layermount.json"
    source = image.source if image.format == "registry" else os.path.abspath(image.source)
    info = {"image": source, "image_id": image.id, "store": str(store.root),
            "layers": [layer.diff_id for layer in layers]}
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("layers") != info["layers"]:
            raise UsageError(f"upper {path}: was made on another image ({previous.get('image')})")
    else:
        record.write_text(json.dumps(info, indent=1))
    return str(root / "diff"), str(root / "work")


def _open_upper(upper: tuple[str, str], whiteout_form: str):
    try:
        return UpperLayer(upper[0], upper[1], whiteout_form)
    except OSError as exc:
        raise UsageError(f"upper {upper[0]}: {exc.strerror}") from None


def mount_lowerdirs(lowerdirs: list[str], options: MountOptions, upperdir: str | None = None,
                    workdir: str | None = None, whiteout_form: str = OVERLAY) -> int:
    """Mount plain layer directories, top first, as kernel overlayfs' lowerdir= takes them."""
    for kind, path in [("lowerdir", p) for p in lowerdirs] + [("upperdir", upperdir), ("workdir", workdir)]:
        if path is not None and not os.path.isdir(path):
            raise UsageError(f"{kind} {path}: not a directory")
    if (upperdir is None) != (workdir is None):
        raise UsageError("upperdir= and workdir= go together")
    options.read_only = options.read_only or upperdir is None

    def open_view() -> MergedView:
        upper = _open_upper((upperdir, workdir), whiteout_form) if upperdir and not options.read_only else None
        return MergedView([Layer.open(path) for path in lowerdirs], upper)
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
    try:
        return json.loads(os.getxattr(mountpoint, STACK_XATTR.decode()))
    except OSError as exc:
        raise MountError(f"{mountpoint}: cannot ask the daemon for its layers: {exc.strerror}") from None


def remove_tree(path: Path) -> None:
    from .store import remove_tree as remove

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
        record = json.loads(record_path.read_text())
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
              progress=None, jobs: int | None = None) -> int:
    """Mount the image, run ``command`` (or its Entrypoint + Cmd) inside, unmount; return the exit code."""
    from .mount import unmount
    from .runtime import container_for, fresh_volumes, run

    mountpoint = tempfile.mkdtemp(prefix="layermount-run-")
    volumes_base = None
    try:
        user = ((image.config.get("config") or {}).get("User") or "").split(":")[0]
        # FUSE lets only the mounting user in unless allow_other: needed when the image runs as another.
        options = MountOptions(mountpoint=mountpoint, allow_other=user not in ("", "root", "0"))
        mount_image(image, store, options, progress, upper_dir, jobs)
        try:
            container = container_for(image.config, mountpoint, command)
            container.volumes, volumes_base = fresh_volumes(image.config)
            for inside in container.volumes:
                print(f"layermount: volume {inside} is a fresh temporary directory; writes there "
                      f"do not go to the upper layer", file=sys.stderr)
            return run(container)
        finally:
            unmount(mountpoint)
    finally:
        if volumes_base is not None:
            shutil.rmtree(volumes_base, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)
