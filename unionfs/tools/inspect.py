"""``layermount inspect``: an image's metadata in the form ``docker inspect`` and ``podman image inspect`` print.

Docker's key names (``Id``, ``RepoTags``, ``Config``, ``RootFS``...), so that
scripts and ``--format '{{.Config.Cmd}}'`` written for them work unchanged.
What only layermount knows (where each blob lives, its media type) is under
``Layermount``.
"""

from __future__ import annotations

import copy

from ..errors import ImageError
from ..image.model import Image


def inspect_image(image: Image) -> dict:
    """One image as ``docker image inspect`` shows it. Fields absent from the image are null or empty."""
    if not image.layers:
        raise ImageError(f"{image.source}: image has no layers")
    config = image.config
    history = image.history()
    layer_steps = [entry for entry in history if not entry.get("empty_layer")]
    layers = []
    for index, ref in enumerate(image.layers):
        step = layer_steps[index] if index < len(layer_steps) else {}
        layers.append({"Digest": ref.digest, "DiffID": ref.diff_id, "Size": ref.size, "MediaType": ref.media_type,
                       "CreatedBy": step.get("created_by", ""), "Created": step.get("created", "")})
    sizes = [ref.size for ref in image.layers]
    return {
        "Id": image.id,
        "RepoTags": list(image.repo_tags),
        "RepoDigests": list(image.repo_digests),   # pulled images only: an archive does not say
        "Parent": "",
        "Comment": _comment(history),
        "Created": config.get("created"),
        "Author": config.get("author", ""),
        "Config": copy.deepcopy(config.get("config") or {}),
        "Architecture": config.get("architecture", ""),
        "Variant": config.get("variant", ""),
        "Os": config.get("os", ""),
        "Size": sum(sizes) if None not in sizes else None,      # the blobs, as stored in the image
        "RootFS": {"Type": "layers", "Layers": [ref.diff_id for ref in image.layers]},
        "History": copy.deepcopy(history),
        "Layermount": {"Source": image.source, "Format": image.format, "Platform": image.platform,
                       "Layers": layers},
    }


def _comment(history: list[dict]) -> str:
    return history[-1].get("comment", "") if history else ""
