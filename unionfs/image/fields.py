"""Type checks for every field layermount reads from an image's JSON (manifests, indexes, configs).

An image is written by whoever built it: ``"os": 5``, annotations as a list
or a string where a list belongs must be one clear ImageError here, not a
traceback (or a string split into characters) wherever the field is used.
Absent fields and JSON null are allowed throughout, as docker writes them.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ImageError

MAX_JSON_DEPTH = 64      # real manifests and configs nest 4 or 5 deep


def _string(value: object) -> bool:
    return isinstance(value, str)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _boolean(value: object) -> bool:
    return isinstance(value, bool)


def _object(value: object) -> bool:
    return isinstance(value, dict)


def _list_of_objects(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _string_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(item, str) for item in value.values())


_NAMES = {_string: "a string", _integer: "a non-negative integer", _boolean: "true or false",
          _object: "an object", _list_of_objects: "a list of objects", _strings: "a list of strings",
          _string_map: "an object of strings"}

PLATFORM = {"os": _string, "architecture": _string, "variant": _string, "os.version": _string,
            "os.features": _strings, "features": _strings}
DESCRIPTOR = {"mediaType": _string, "digest": _string, "size": _integer, "annotations": _string_map,
              "platform": _object, "urls": _strings, "artifactType": _string}
MANIFEST = {"schemaVersion": _integer, "mediaType": _string, "config": _object, "layers": _list_of_objects,
            "manifests": _list_of_objects, "annotations": _string_map}
CONFIG = {"os": _string, "architecture": _string, "variant": _string, "created": _string, "author": _string,
          "config": _object, "rootfs": _object, "history": _list_of_objects}
RUNTIME = {"Env": _strings, "Cmd": _strings, "Entrypoint": _strings, "WorkingDir": _string, "User": _string,
           "Volumes": _object, "ExposedPorts": _object, "Labels": _string_map, "StopSignal": _string}
HISTORY = {"created": _string, "created_by": _string, "comment": _string, "author": _string,
           "empty_layer": _boolean}
ROOTFS = {"type": _string, "diff_ids": _strings}
ARCHIVE_ENTRY = {"Config": _string, "Layers": _strings, "RepoTags": _strings, "LayerSources": _object}


def check_fields(label: str, where: str, document: dict, fields: dict[str, Callable[[object], bool]]) -> dict:
    """``document`` itself, after checking the type of each field in ``fields`` it has."""
    if not isinstance(document, dict):
        raise ImageError(f"{label}: {where} is not a JSON object")
    for name, valid in fields.items():
        value = document.get(name)
        if value is not None and not valid(value):
            raise ImageError(f"{label}: {where}: field {name!r} is not {_NAMES[valid]} "
                             f"(it is {type(value).__name__})")
    return document


def check_descriptor(label: str, where: str, descriptor: object) -> dict:
    check_fields(label, where, descriptor, DESCRIPTOR)
    if descriptor.get("platform") is not None:
        check_fields(label, f"{where}: platform", descriptor["platform"], PLATFORM)
    return descriptor


def check_config(label: str, config: object) -> dict:
    """An image config whose every field layermount uses has the type the image spec gives it."""
    check_fields(label, "image config", config, CONFIG)
    check_fields(label, "image config: config", config.get("config") or {}, RUNTIME)
    check_fields(label, "image config: rootfs", config.get("rootfs") or {}, ROOTFS)
    for number, entry in enumerate(config.get("history") or [], 1):
        check_fields(label, f"image config: history entry {number}", entry, HISTORY)
    return config


def check_depth(label: str, where: str, document: object) -> None:
    """ImageError if ``document`` nests deeper than any real one (walked with a loop, not recursion)."""
    pending = [(document, 1)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_JSON_DEPTH:
            raise ImageError(f"{label}: {where} nests more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(value, dict):
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
