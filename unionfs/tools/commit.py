"""``layermount commit``: an image plus an upper written as a new image with one more layer."""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import stat
import tempfile

from ..errors import UsageError
from ..image.compression import open_decompressed
from ..image.model import Image
from ..image.writer import write_image
from .diff import write_layer_tar
from .locate import UpperInfo


def commit(image: Image, upper: UpperInfo, out: str, *, message: str | None = None, image_format: str = "docker",
           tag: str | None = None) -> str:
    """Write a new image: ``image`` with the upper appended as one more layer; return its id."""
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

    from ..image.model import LayerRef
    from ..image.oci_layout import OCI_LAYER
    from ..image.registry import push_image

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
        committed = Image(source=image.source, layers=[*image.layers, new_layer], config=config,
                               format=image.format, origin=image.origin)
        return push_image(committed, destination, options, say)
