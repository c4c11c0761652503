"""Attacks on the command line's output and on run -t: what an image wrote must not drive the terminal."""

from __future__ import annotations

import json
import os

import pytest

from conftest import run_layermount
from test_run_attacks import (escape_binary, hostile_image, skip_without_tiocsti,  # noqa: F401 - fixtures
                              typed_into_the_terminal)
from unionfs.image.writer import File, layer_tar, new_config, write_image

PAYLOAD = "evil\x1b]0;owned\x07\x1b[2J\rFORGED\u202e"
ESCAPED = "evil\\x1b]0;owned\\x07\\x1b[2J\\rFORGED\\u202e"


def assert_terminal_safe(*texts: str) -> None:
    for text in texts:
        for control in ("\x1b", "\x07", "\r", "\u202e"):
            assert control not in text, f"raw {control!r} reached the terminal: {text!r}"


@pytest.fixture
def hostile(tmp_path):
    config = new_config([f"RUN {PAYLOAD}"])
    config["config"] = {"Cmd": [PAYLOAD], "Env": [f"X={PAYLOAD}"]}
    config["history"][0]["comment"] = PAYLOAD
    config["created"] = PAYLOAD
    path = tmp_path / "hostile.tar"
    write_image(path, [layer_tar([File(f"bin/su{PAYLOAD}", b"x", mode=0o4755)])], config, repo_tag="evil:1")
    return path


def test_every_new_output_form_escapes_what_the_image_wrote(hostile, store_dir):
    """Attack: build steps, Cmd, Env, created time and a file name carrying OSC/CSI/CR/bidi, shown by
    inspect (text and --format), history (--no-trunc, --human=false), lint (grouped info), store ls.
    Must hold: escaped on the terminal in every form, exact in every --json."""
    outputs = [run_layermount("inspect", hostile), run_layermount("inspect", hostile, "--format", "{{.Config}}"),
               run_layermount("inspect", hostile, "--format", "{{.Created}} {{json .Config.Cmd}}"),
               run_layermount("history", hostile, "--store", store_dir),
               run_layermount("history", hostile, "--store", store_dir, "--no-trunc", "--human=false"),
               run_layermount("lint", hostile)]
    run_layermount("unpack", hostile, "--store", store_dir, "-q", check=True)
    outputs.append(run_layermount("store", "ls", "--store", store_dir, "--layers"))
    for result in outputs:
        assert result.returncode == 0, result.stderr
        assert_terminal_safe(result.stdout, result.stderr)
    assert all("evil" in result.stdout for result in outputs[:6])
    exact = json.loads(run_layermount("history", hostile, "--json", "--store", store_dir).stdout)
    assert exact[0]["CreatedBy"] == f"RUN {PAYLOAD}" and exact[0]["Comment"] == PAYLOAD
    assert json.loads(run_layermount("inspect", hostile, "--json").stdout)[0]["Config"]["Cmd"] == [PAYLOAD]


@pytest.mark.skipif(os.geteuid() != 0, reason="run needs root (namespaces)")
@pytest.mark.parametrize("flags", [["-t"], ["-it"]])
def test_tiocsti_under_run_t_types_only_into_the_containers_own_pty(tmp_path, store_dir, escape_binary, flags):
    """Attack: with -t the command has a controlling terminal again, and uses TIOCSTI on it to type
    "echo INJECTED" for the host's shell. Must hold: it lands in the container's own pty (which
    ends with the run); nothing is queued on the terminal that started layermount."""
    skip_without_tiocsti()
    monkey_tmp = tmp_path / "tmpdir"
    monkey_tmp.mkdir()
    image = hostile_image(tmp_path / "img.tar", escape_binary)
    result, queued = typed_into_the_terminal(image, store_dir, *flags, env=dict(os.environ, TMPDIR=str(monkey_tmp)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"INJECTED" not in queued
