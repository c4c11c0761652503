"""The merge rules on their own: OCI layer.md and kernel overlayfs semantics, no FUSE."""

from hypothesis import given, strategies as st

from unionfs.whiteout import DirListing, merge, whiteout_target


def raw(names):
    """names maps each raw name (markers included) to whether it is a directory."""
    return DirListing.from_names(names)


def test_whiteout_target():
    assert whiteout_target(".wh.foo") == "foo"
    assert whiteout_target(".wh..wh..opq") is None
    assert whiteout_target(".wh..wh.plnk") is None
    assert whiteout_target(".wh..") is None
    assert whiteout_target(".wh...") is None
    assert whiteout_target("foo") is None


def test_top_layer_wins_for_files():
    merged = merge([raw({"a": False}), raw({"a": False, "b": False})])
    assert merged["a"].sources == (0,)
    assert merged["b"].sources == (1,)


def test_whiteout_hides_lower_and_is_never_shown():
    merged = merge([raw({".wh.a": False}), raw({"a": False, "b": True})])
    assert set(merged) == {"b"}


def test_whiteout_does_not_hide_its_own_layer():
    merged = merge([raw({".wh.a": False, "a": True}), raw({"a": True})])
    assert merged["a"].sources == (0,)


def test_directories_merge_down_to_a_whiteout():
    merged = merge([raw({"d": True}), raw({"d": True, ".wh.d": False}), raw({"d": True})])
    assert merged["d"].sources == (0, 1)


def test_non_directory_above_hides_directory_below_and_back():
    merged = merge([raw({"x": False, "y": True}), raw({"x": True, "y": False}), raw({"y": True})])
    assert merged["x"].sources == (0,) and not merged["x"].is_dir
    assert merged["y"].sources == (0,) and merged["y"].is_dir


def test_opaque_directory_stops_the_merge_below_it():
    merged = merge([raw({"a": False}), raw({".wh..wh..opq": False, "b": False}), raw({"c": False})])
    assert set(merged) == {"a", "b"}


def test_missing_layers_are_skipped():
    merged = merge([None, raw({"d": True}), None, raw({"d": True})])
    assert merged["d"].sources == (1, 3)


def test_aufs_meta_names_are_invisible():
    merged = merge([raw({".wh..wh.plnk": True, ".wh..wh.aufs": False, "ok": False})])
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
    merged = merge([raw(layer) for layer in layers])
    expected = reference_visible(layers)
    assert {name: entry.winner for name, entry in merged.items()} == expected
