"""``layermount inspect``: an image's metadata in the form ``docker inspect`` prints."""

from __future__ import annotations

from ..errors import ImageError
from ..image.model import Image


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
        "platform": image.platform, "created": image.config.get("created"), "layers": layers,
        "history": history,
        "config": {key: config.get(key) for key in
                   ("Env", "Cmd", "Entrypoint", "WorkingDir", "ExposedPorts", "Volumes", "User", "Labels")},
    }
