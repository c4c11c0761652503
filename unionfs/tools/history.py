"""``layermount history``: an image's build steps, top first, as ``docker history`` lists them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..image.model import Image

if TYPE_CHECKING:
    from ..store import LayerStore


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
