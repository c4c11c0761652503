"""The merge rules on their own (unionfs.overlay.merge): OCI layer.md and kernel overlayfs semantics, no FUSE."""

import os

from hypothesis import given, strategies as st

from unionfs.overlay.merge import DirListing, merge


def merged_of(*layers):
    """Merge layers given top first, each a dict of raw names (markers included, str for
    readability) to whether it is a directory, or None; the result keyed by str again."""
    listings = [None if names is None else DirListing.from_names({os.fsencode(n): d for n, d in names.items()})
                for names in layers]
    return {os.fsdecode(name): entry for name, entry in merge(listings).items()}


def test_top_layer_wins_for_files():
    merged = merged_of({"a": False}, {"a": False, "b": False})
    assert merged["a"].sources == (0,)
    assert merged["b"].sources == (1,)


def test_whiteout_hides_lower_and_is_never_shown():
    merged = merged_of({".wh.a": False}, {"a": False, "b": True})
    assert set(merged) == {"b"}


def test_whiteout_does_not_hide_its_own_layer():
    merged = merged_of({".wh.a": False, "a": True}, {"a": True})
    assert merged["a"].sources == (0,)


def test_directories_merge_down_to_a_whiteout():
    merged = merged_of({"d": True}, {"d": True, ".wh.d": False}, {"d": True})
    assert merged["d"].sources == (0, 1)


def test_non_directory_above_hides_directory_below_and_back():
    merged = merged_of({"x": False, "y": True}, {"x": True, "y": False}, {"y": True})
    assert merged["x"].sources == (0,) and not merged["x"].is_dir
    assert merged["y"].sources == (0,) and merged["y"].is_dir


def test_opaque_directory_stops_the_merge_below_it():
    merged = merged_of({"a": False}, {".wh..wh..opq": False, "b": False}, {"c": False})
    assert set(merged) == {"a", "b"}


def test_missing_layers_are_skipped():
    merged = merged_of(None, {"d": True}, None, {"d": True})
    assert merged["d"].sources == (1, 3)


def test_aufs_meta_names_are_invisible():
    merged = merged_of({".wh..wh.plnk": True, ".wh..wh.aufs": False, "ok": False})
    assert set(merged) == {"ok"}


# A reference model: resolve each name by walking layers top-down literally.
def reference_visible(layers):
    visible = {}
    names = {n for layer in layers for n in layer if not n.startswith(".wh.")}
    for name in names:
        for index, layer in enumerate(layers):
            if name in layer:
                visible[name] = index
                break
            if ".wh." + name in layer or ".wh..wh..opq" in layer:
                break
    return visible


names = st.sampled_from(["a", "b", "c", ".wh.a", ".wh.b", ".wh..wh..opq"])
layer_strategy = st.dictionaries(names, st.booleans(), max_size=5)


@given(st.lists(layer_strategy, min_size=1, max_size=5))
def test_merge_matches_a_literal_top_down_walk(layers):
    # Same-layer whiteout+entry: the entry is visible from that layer (it is checked first above).
    merged = merged_of(*layers)
    expected = reference_visible(layers)
    assert {name: entry.winner for name, entry in merged.items()} == expected
