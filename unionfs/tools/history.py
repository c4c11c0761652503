"""``layermount history``: an image's build steps, top first, as ``docker history`` lists them.

One meaning of SIZE, docker's: what the step's layer holds unpacked (known
once the store has it, else None); the blob's size in the image is
``blob_size``. ``image`` is the image's id on the top step and None (docker's
``<missing>``) on the steps below, which are no image of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..image.model import Image

if TYPE_CHECKING:
    from ..store import LayerStore


@dataclass
class HistoryStep:
    """One build step of an image."""

    image: str | None          # the image id for the top step; None ("<missing>") below
    diff_id: str | None        # None for a step that made no layer (ENV, CMD, EXPOSE ...)
    created: str
    created_by: str
    comment: str
    size: int | None           # unpacked size of the layer; 0 for an empty step; None if not in the store
    blob_size: int | None      # size of the layer blob in the image
    in_store: bool | None      # None for an empty step

    def as_json(self) -> dict:
        return {"Id": self.image or "<missing>", "Created": self.created, "CreatedBy": self.created_by,
                "Comment": self.comment, "Size": self.size, "BlobSize": self.blob_size, "DiffID": self.diff_id,
                "EmptyLayer": self.diff_id is None, "InStore": self.in_store}


def history(image: Image, store: "LayerStore") -> list[HistoryStep]:
    """The build steps, top first; each layer step says whether the store already has it."""
    steps = []
    layers = iter(image.layers)
    entries = image.history() or [{} for _ in image.layers]
    for entry in entries:
        text = (entry.get("created", ""), entry.get("created_by", ""), entry.get("comment", ""))
        if entry.get("empty_layer"):
            steps.append(HistoryStep(None, None, *text, 0, 0, None))
            continue
        ref = next(layers, None)
        if ref is None:
            break
        stored = store.layer(ref.diff_id) if ref.diff_id else None
        steps.append(HistoryStep(None, ref.diff_id or ref.digest, *text, stored.size if stored else None,
                                 ref.size, stored is not None))
    for ref in layers:   # more layers than history entries: still show them
        stored = store.layer(ref.diff_id) if ref.diff_id else None
        steps.append(HistoryStep(None, ref.diff_id or ref.digest, "", "", "", stored.size if stored else None,
                                 ref.size, stored is not None))
    steps.reverse()
    if steps:
        steps[0].image = image.id
    return steps
