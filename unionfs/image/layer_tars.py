"""Plain layer tars given one by one, bottom first: an image with no manifest and no config.

Nothing records digests for them, so the store computes diff_ids as it
unpacks; the config is made up so that inspect and commit have history to show.
"""

from __future__ import annotations

import functools
import os
import stat

from ..errors import ImageError, UsageError
from .model import Image, LayerRef


def open_layer_tars(paths: list) -> Image:
    """An image of the layer tars at ``paths`` (bottom first), each plain, gzip or zstd."""
    if not paths:
        raise UsageError("no layer tars given")
    paths = [os.fspath(path) for path in paths]
    layers = []
    for path in paths:
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ImageError(f"{path}: cannot open layer tar: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{path}: not a layer tar (not a regular file)")
        layers.append(LayerRef(name=path, open=functools.partial(open, path, "rb"), size=info.st_size))
    from .writer import new_config  # the image writer (and zstandard) is not needed to read images

    config = new_config([f"layermount unpack {os.path.basename(path)}" for path in paths])
    return Image(source=paths[0], layers=layers, config=config, format="layer-tars")
