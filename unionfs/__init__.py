"""layermount: mount a container image as one root filesystem.

The library (see the README's "Python API"): ``mounted``, ``unpack``, ``diff``,
``commit`` and ``open_image``. They are imported on first use, so that
``python -m unionfs`` and the mount daemon start without loading them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = '0.1.0'

__all__ = ["Change", "Image", "LayermountError", "Mounted", "commit", "diff", "mounted", "open_image", "unpack",
           "__version__"]

_HOMES = {"Mounted": "library", "commit": "library", "diff": "library", "mounted": "library",
          "open_image": "library", "unpack": "library", "Change": "tools.diff", "Image": "image.model",
          "LayermountError": "errors"}

if TYPE_CHECKING:
    from .errors import LayermountError
    from .image.model import Image
    from .library import Mounted, commit, diff, mounted, open_image, unpack
    from .tools.diff import Change


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'unionfs' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{home}", __name__), name)
