"""The content-addressed layer store: each layer unpacked once, verified, atomically, shared by all images.

Layout under the store root::

    layers/<hex>/diff/         the layer's files as its tar says (whiteout markers kept)
    layers/<hex>/layer.json    digests, sizes, whether ownership lives in override xattrs
    images/<hex>.json          an image that was unpacked: its layers and config
    blobs/<hex>                blob digest -> diff_id, for sources that do not record diff_ids
    tmp/<key>.<random>/        unpacks in progress (a killed unpack leaves only these)
    partial/<hex>              the first bytes of a registry blob whose download broke off, to resume from
    locks/<key>.lock           flock: exclusive while unpacking or collecting, shared while mounted

``<hex>`` is the sha256 of the uncompressed layer tar (the diff_id), so a layer
shared by ten images is one directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import multiprocessing
import os
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from .errors import DigestMismatch, ImageError, LayermountError, StoreError, UsageError
from . import fstree
from .extract import extract_layer
from .hashing import HashingReader
from .image.compression import open_decompressed
from .image.model import Image, LayerRef
from .readahead import ReadAhead

SHA256 = "sha256:"
# The store holds layers unpacked as root: setuid-root binaries and device nodes, outside any
# nosuid,nodev mount. Nobody but its owner may reach into it (the FUSE daemon reads it as the owner).
PRIVATE = 0o700


def default_store_path() -> Path:
    """--store wins; then $LAYERMOUNT_STORE; then the system or per-user data dir."""
    if env := os.environ.get("LAYERMOUNT_STORE"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/layermount")
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data_home) / "layermount"


def hex_of(digest: str) -> str:
    if not digest.startswith(SHA256) or len(digest) != len(SHA256) + 64:
        raise ImageError(f"unsupported digest {digest!r} (only sha256 is supported)")
    hexpart = digest[len(SHA256):]
    if any(c not in "0123456789abcdef" for c in hexpart):
        raise ImageError(f"malformed digest {digest!r}")
    return hexpart


def short_id(digest: str | None) -> str:
    return (digest or "")[len(SHA256):][:12] if digest else "????????????"


@dataclass
class StoredLayer:
    """A complete layer in the store."""

    diff_id: str
    path: Path             # the layer's files (the "diff" dir)
    meta: dict

    @property
    def rootless(self) -> bool:
        """Ownership and special modes are recorded in override xattrs, not applied."""
        return bool(self.meta.get("rootless"))

    @property
    def size(self) -> int:
        return int(self.meta.get("size", 0))


ProgressFn = Callable[[str, str, int, int | None], None]
"""progress(layer_short_id, status, bytes_done, bytes_total)"""


def _no_progress(short: str, status: str, done: int, total: int | None) -> None:
    pass


class LayerStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_store_path()
        self.layers_dir = self.root / "layers"
        self.images_dir = self.root / "images"
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.partial_dir = self.root / "partial"
        self.locks_dir = self.root / "locks"

    # ---- set-up -----------------------------------------------------------
    def ensure(self) -> "LayerStore":
        """Create the layout (private: see ``PRIVATE``) and clear what killed unpacks left behind."""
        try:
            self.root.mkdir(mode=PRIVATE, parents=True, exist_ok=True)
            _make_private(self.root)
            for directory in (self.layers_dir, self.images_dir, self.blobs_dir, self.tmp_dir, self.locks_dir,
                              self.partial_dir):
                directory.mkdir(mode=PRIVATE, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot create it: {exc.strerror}") from None
        self._clean_leftovers()
        return self

    def _clean_leftovers(self) -> None:
        for leftover in self.tmp_dir.iterdir():
            key = leftover.name.split(".", 1)[0]
            with self._try_lock(key) as locked:
                if locked:
                    self._remove(leftover)

    def _remove(self, path: Path) -> None:
        try:
            fstree.remove_tree(path)
        except OSError as exc:
            raise StoreError(f"store {self.root}: cannot remove {path}: {exc.strerror or exc}") from None

    # ---- locking ----------------------------------------------------------
    def _lock_path(self, key: str) -> Path:
        return self.locks_dir / f"{key}.lock"

    @contextlib.contextmanager
    def _lock(self, key: str, mode: int = fcntl.LOCK_EX) -> Iterator[None]:
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _try_lock(self, key: str) -> Iterator[bool]:
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
            else:
                yield True
        finally:
            os.close(fd)

    def hold_layers(self, diff_ids: list[str]) -> list[int]:
        """Shared locks that keep ``gc`` off these layers while a mount uses them.

        The returned fds must stay open for the mount's life (closing releases).
        """
        fds = []
        for diff_id in diff_ids:
            fd = os.open(self._lock_path(hex_of(diff_id)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            fds.append(fd)
        return fds

    def scratch_upper(self) -> tuple[str, int]:
        """A throw-away upper for one mount, and the lock fd that marks it live.

        A daemon killed without cleaning up leaves it unlocked in tmp/, where
        the next ``ensure`` removes it.
        """
        self.ensure()
        key = "mount-" + os.urandom(8).hex()
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return tempfile.mkdtemp(prefix=key + ".", dir=self.tmp_dir), fd

    # ---- lookup -----------------------------------------------------------
    def layer(self, diff_id: str) -> StoredLayer | None:
        layer_dir = self.layers_dir / hex_of(diff_id)
        try:
            meta = json.loads((layer_dir / "layer.json").read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"store {self.root}: layer {short_id(diff_id)} is damaged: {exc}") from None
        return StoredLayer(diff_id, layer_dir / "diff", meta)

    def layers(self) -> list[StoredLayer]:
        found = []
        if self.layers_dir.is_dir():
            for entry in sorted(self.layers_dir.iterdir()):
                layer = self.layer(SHA256 + entry.name)
                if layer is not None:
                    found.append(layer)
        return found

    def images(self) -> list[dict]:
        records = []
        if self.images_dir.is_dir():
            for entry in sorted(self.images_dir.glob("*.json")):
                with contextlib.suppress(OSError, ValueError):
                    records.append(json.loads(entry.read_text()))
        return records

    def _known_diff_id(self, blob_digest: str) -> str | None:
        with contextlib.suppress(OSError):
            return (self.blobs_dir / hex_of(blob_digest)).read_text().strip()
        return None

    # ---- unpack -----------------------------------------------------------
    def unpack_image(self, image: Image, progress: ProgressFn = _no_progress, jobs: int | None = None) -> list[StoredLayer]:
        """Make every layer of ``image`` present in the store; return them bottom first.

        Layers unpack in parallel; each is verified against the digests the
        image records before it becomes visible.
        """
        self.ensure()
        started = time.time()
        missing = [index for index, ref in enumerate(image.layers)
                   if ref.diff_id is None or self.layer(ref.diff_id) is None]
        jobs = min(jobs or os.cpu_count() or 1, len(missing))
        results, first_error = [], None
        if jobs <= 1:
            for index, ref in enumerate(image.layers):
                try:
                    results.append(self._unpack_layer(image, index, ref, progress))
                except LayermountError as exc:
                    first_error = first_error or exc
        else:
            results, first_error = self._unpack_in_processes(image, progress, jobs)
        if first_error is not None:
            # A bad image leaves the store as it found it: drop what this run added.
            used = self._used_layers()
            for layer in results:
                if layer.meta.get("unpacked_at", 0) >= started and layer.diff_id not in used:
                    with self._try_lock(hex_of(layer.diff_id)) as locked:
                        if locked:
                            self._remove_layer(layer)
                            (self.blobs_dir / hex_of(layer.meta["digest"])).unlink(missing_ok=True)
            raise first_error
        self._record_image(image, results)
        return results

    def _unpack_in_processes(self, image: Image, progress: ProgressFn, jobs: int):
        """One forked worker per core: extraction is Python work, which threads would serialise.

        Workers inherit the image by fork (its streams read with pread, so
        they share nothing) and send their progress back through a queue.
        """
        global _FORKED_JOB
        context = multiprocessing.get_context("fork")
        events = context.SimpleQueue()
        _FORKED_JOB = (self, image, events)
        forwarder = threading.Thread(target=_forward_progress, args=(events, progress), daemon=True)
        forwarder.start()
        results, first_error = [], None
        try:
            with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = [pool.submit(_unpack_forked, index) for index in range(len(image.layers))]
                for future in futures:
                    try:
                        results.append(future.result())
                    except LayermountError as exc:
                        first_error = first_error or exc
                    except concurrent.futures.process.BrokenProcessPool:
                        first_error = first_error or StoreError(f"{image.source}: an unpack worker died")
        finally:
            _FORKED_JOB = None
            events.put(None)
            forwarder.join()
        return results, first_error

    def _unpack_layer(self, image: Image, index: int, ref: LayerRef, progress: ProgressFn) -> StoredLayer:
        label = f"{image.source}: layer {index + 1} ({ref.name})"
        diff_id = ref.diff_id
        if diff_id is None and ref.digest is not None:
            diff_id = self._known_diff_id(ref.digest)
        if diff_id is not None:
            key = hex_of(diff_id)
            short = short_id(diff_id)
        else:
            # Nothing tells the diff_id before reading: unpack under a key of our own.
            key = "unknown-" + os.urandom(8).hex()
            short = short_id(ref.digest) if ref.digest else f"layer {index + 1}"
        if diff_id is not None and (existing := self.layer(diff_id)) is not None:
            progress(short, "Already exists", existing.size, existing.size)
            return existing
        with self._lock(key):
            if diff_id is not None and (existing := self.layer(diff_id)) is not None:
                progress(short, "Already exists", existing.size, existing.size)
                return existing
            work = Path(tempfile.mkdtemp(prefix=key + ".", dir=self.tmp_dir))
            try:
                meta = self._extract_verified(ref, work, label, short, diff_id, progress)
                if diff_id is not None:
                    stored = self._publish(work, meta)
                else:
                    with self._lock(hex_of(meta["diff_id"])):
                        stored = self._publish(work, meta)
            finally:
                self._remove(work)
                if diff_id is None:
                    # A random key is never used again: its lock file goes (we still hold it, tmp/ is clean).
                    self._lock_path(key).unlink(missing_ok=True)
        progress(short_id(stored.diff_id), "Pull complete", meta["compressed_size"], meta["compressed_size"])
        return stored

    def _extract_verified(self, ref: LayerRef, work: Path, label: str, short: str,
                          expected_diff_id: str | None, progress: ProgressFn) -> dict:
        """Unpack into ``work``/diff while hashing both streams; return the layer's metadata."""
        diff_dir = work / "diff"
        diff_dir.mkdir()
        try:
            blob = ref.open(partial_dir=self.partial_dir) if ref.remote else ref.open()
        except OSError as exc:
            raise ImageError(f"{label}: cannot read blob: {exc.strerror or exc}") from None
        # A registry layer is downloaded and extracted in the same pass: its progress speaks of downloading.
        reading = "Downloading" if ref.remote else "Extracting"
        with blob:
            compressed = _ProgressReader(HashingReader(blob), lambda done: progress(short, reading, done, ref.size))
            try:
                uncompressed = HashingReader(open_decompressed(compressed))
                # Reading, hashing and decompressing run in a thread beside the extraction.
                with ReadAhead(uncompressed) as tar_stream:
                    stats = extract_layer(tar_stream, diff_dir)
                    tar_stream.drain()
                compressed.drain()
            except ImageError as exc:
                _blame_wrong_blob(ref, compressed, label)
                prefixed = type(exc)(f"{label}: {exc}")
                prefixed.__dict__.update(exc.__dict__)   # keeps .member of an UnsafeArchive
                raise prefixed from None
            except OSError as exc:
                raise StoreError(f"{label}: cannot write to store {self.root}: {exc.strerror or exc}") from None
        digest, diff_id = compressed.digest, uncompressed.digest
        progress(short, "Verifying Checksum", compressed.bytes_read, ref.size)
        if ref.remote:
            progress(short, "Download complete", compressed.bytes_read, ref.size)
        if ref.digest is not None and digest != ref.digest:
            raise DigestMismatch(f"{label}: blob digest mismatch: image says {ref.digest}, content is {digest}")
        if expected_diff_id is not None and diff_id != expected_diff_id:
            raise DigestMismatch(f"{label}: diff_id mismatch: image says {expected_diff_id}, content is {diff_id}")
        meta = {
            "diff_id": diff_id,
            "digest": digest,
            "media_type": ref.media_type,
            "compressed_size": compressed.bytes_read,
            "tar_size": uncompressed.bytes_read,
            "size": stats.bytes,
            "entries": stats.entries,
            "rootless": bool(stats.overrides),
            "unpacked_at": time.time(),
        }
        (work / "layer.json").write_text(json.dumps(meta, indent=1))
        return meta

    def _publish(self, work: Path, meta: dict) -> StoredLayer:
        """Rename a verified unpack into place (caller holds the layer's lock).

        A layer dir exists only once complete; if another unpack of the same
        content won the race, theirs is kept and ours discarded.
        """
        diff_id = meta["diff_id"]
        final = self.layers_dir / hex_of(diff_id)
        if not final.exists():
            try:
                os.rename(work, final)
            except OSError as exc:
                raise StoreError(f"store {self.root}: cannot publish layer {short_id(diff_id)}: {exc.strerror}") from None
            _fsync_dir(self.layers_dir)
        (self.blobs_dir / hex_of(meta["digest"])).write_text(diff_id + "\n")
        return self.layer(diff_id)

    def _record_image(self, image: Image, layers: list[StoredLayer]) -> None:
        record = {
            "id": image.id,
            "source": image.source if image.format == "registry" else os.path.abspath(image.source),
            "format": image.format,
            "repo_tags": image.repo_tags,
            "repo_digests": image.repo_digests,
            "platform": image.platform,
            "layers": [layer.diff_id for layer in layers],
            "config": image.config,
            "recorded_at": time.time(),
        }
        path = self.images_dir / f"{hex_of(image.id)}.json"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)

    # ---- maintenance ------------------------------------------------------
    def _used_layers(self) -> set[str]:
        return {diff_id for record in self.images() for diff_id in record.get("layers", [])}

    def _remove_layer(self, layer: StoredLayer) -> None:
        """Rename away first, so no reader ever sees a half-removed layer (caller holds its lock)."""
        hexpart = hex_of(layer.diff_id)
        doomed = Path(tempfile.mkdtemp(prefix=f"gc-{hexpart}.", dir=self.tmp_dir))
        os.rename(self.layers_dir / hexpart, doomed / "layer")
        self._remove(doomed)

    def remove_image(self, name: str) -> list[str]:
        """Forget the one recorded image ``name`` names; return its id.

        A tag or source path names images exactly; an id may be shortened to
        ``MIN_ID_PREFIX`` hex digits. A name that fits several images, or an
        id shorter than that, is refused before anything is forgotten: the
        next gc would delete every layer they leave unused.
        """
        records = self.images()
        matches = [record for record in records if _names_exactly(record, name)]
        if not matches and (prefix := _id_prefix(name)) is not None:
            matches = [record for record in records
                       if str(record.get("id", ""))[len(SHA256):].startswith(prefix)]
            if matches and len(prefix) < MIN_ID_PREFIX:
                raise UsageError(f"store rm {_ids_shown(name)}: too short an id (give at least {MIN_ID_PREFIX} "
                                 f"hex digits); it starts {_ids_shown(matches)}")
        if len(matches) > 1:
            raise UsageError(f"store rm: {len(matches)} images match, give one id: {_ids_shown(matches)}")
        for record in matches:
            (self.images_dir / f"{hex_of(record['id'])}.json").unlink(missing_ok=True)
        return [record["id"] for record in matches]

    def gc(self) -> tuple[list[StoredLayer], list[StoredLayer]]:
        """Remove layers no recorded image uses; return (removed, kept-because-mounted)."""
        self.ensure()
        used = self._used_layers()
        removed, busy = [], []
        for layer in self.layers():
            if layer.diff_id in used:
                continue
            hexpart = hex_of(layer.diff_id)
            with self._try_lock(hexpart) as locked:
                if not locked:
                    busy.append(layer)
                    continue
                self._remove_layer(layer)
                removed.append(layer)
        for partial in self.partial_dir.iterdir():     # broken-off downloads: only worth a resume, not space
            partial.unlink(missing_ok=True)
        return removed, busy


_FORKED_JOB = None   # (store, image, progress queue), inherited by forked unpack workers


def _unpack_forked(index: int) -> StoredLayer:
    store, image, events = _FORKED_JOB
    return store._unpack_layer(image, index, image.layers[index],
                               lambda *event: events.put(event))


def _forward_progress(events, progress: ProgressFn) -> None:
    while (event := events.get()) is not None:
        progress(*event)


MIN_ID_PREFIX = 12   # as docker's short ids


def _names_exactly(record: dict, name: str) -> bool:
    tags = record.get("repo_tags")
    return ((isinstance(tags, list) and name in tags) or name == record.get("source")
            or os.path.abspath(name) == record.get("source") or name == record.get("id"))


def _id_prefix(name: str) -> str | None:
    """The hex digits of an id or id prefix (``sha256:`` optional), or None if ``name`` is not one."""
    digits = name[len(SHA256):] if name.startswith(SHA256) else name
    return digits if all(char in "0123456789abcdef" for char in digits) else None


def _ids_shown(what) -> str:
    """Short ids only (hex, safe to print); tags come from images and are not."""
    if isinstance(what, str):
        return what if _id_prefix(what) is not None else "that name"
    shown = ", ".join(short_id(str(record.get("id"))) for record in what[:8])
    return shown + (f" and {len(what) - 8} more" if len(what) > 8 else "")


def _blame_wrong_blob(ref: LayerRef, compressed: "_ProgressReader", label: str) -> None:
    """A blob that does not unpack is first checked against its digest: "not the blob the image
    names" is the truer error than the damage it causes (a corrupt download, a swapped blob)."""
    if ref.digest is None:
        return
    try:
        compressed.drain()
    except (LayermountError, OSError):
        return       # the rest cannot be read: the original error stands
    if compressed.digest != ref.digest:
        raise DigestMismatch(f"{label}: blob digest mismatch: image says {ref.digest}, "
                             f"content is {compressed.digest}")


class _ProgressReader:
    """Reports bytes read at most every 4 MiB, so progress costs nothing per chunk."""

    def __init__(self, inner: HashingReader, report: Callable[[int], None]):
        self._inner = inner
        self._report = report
        self._next_report = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if self._inner.bytes_read >= self._next_report:
            self._report(self._inner.bytes_read)
            self._next_report = self._inner.bytes_read + (4 << 20)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        self._inner.drain()

    @property
    def digest(self) -> str:
        return self._inner.digest

    @property
    def bytes_read(self) -> int:
        return self._inner.bytes_read


def _make_private(root: Path) -> None:
    """A store made by an older layermount (0755) is closed; another user's store is refused."""
    st = root.stat()
    if st.st_uid != os.geteuid():
        raise StoreError(f"store {root}: owned by uid {st.st_uid}, not by this user")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(root, stat.S_IMODE(st.st_mode) & 0o700)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
