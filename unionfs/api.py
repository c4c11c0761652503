"""The library behind the CLI: open an image, unpack it into the store, mount it, explain a path."""

from __future__ import annotations

import contextlib
import json
import os
import stat
from typing import TYPE_CHECKING
from pathlib import Path

from .errors import ImageError, UsageError
from .layerform import OCI, OVERLAY
from .mount import MountOptions, mount
from .mountopts import ViewOptions
from .progress import PullProgress

if TYPE_CHECKING:
    from .image.model import Image
    from .overlay import MergedView
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
        from .image.auth import DEFAULT_JOBS
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
            # the overlay needs trio: loaded only to mount
            from .overlay import MergedView, layers_from_store

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
    # the overlay needs trio: loaded only to mount
    from .overlay import UpperLayer

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
        # the overlay needs trio: loaded only to mount
        from .overlay import Layer, MergedView

        upper = _open_upper((upperdir, workdir), whiteout_form) if upperdir and not options.read_only else None
        return MergedView([Layer.open(path) for path in lowerdirs], upper, options=view_options)
    return mount(open_view, options)


def remove_tree(path: Path) -> None:
    from .fstree import remove_tree as remove

    remove(path)


def store_for(path: str | None) -> "LayerStore":
    from .store import LayerStore

    return LayerStore(Path(path) if path else None)
