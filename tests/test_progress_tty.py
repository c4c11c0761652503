"""The live progress display in a real terminal (tmux): cut to the width, redrawn on resize, no stale line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import images
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"]
TOTAL = 120_000_000

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux missing (scripts/setup installs it)")

# Drives PullProgress as the store does, with a clock the test controls, in phases the test steps.
DRIVER = f"""
import os, sys, time
from unionfs.progress import PullProgress
now = [0.0]
progress = PullProgress(sys.stdout, live=True, clock=lambda: now[0])
layers = {LAYERS!r}
def wait(name):
    open(name + ".reached", "w").close()
    while not os.path.exists(name + ".go"):
        time.sleep(0.02)
print("before the progress")
for step in range(1, 4):
    for index, layer in enumerate(layers):
        now[0] += 1.0
        progress(layer, "Extracting", step * 10_000_000 * (index + 1), {TOTAL})
wait("wide")
for layer in layers:
    now[0] += 1.0
    progress(layer, "Extracting", 90_000_000, {TOTAL})
wait("narrow")
for layer in layers:
    progress(layer, "Pull complete", {TOTAL}, {TOTAL})
print("DONE")
wait("end")
"""


class Tmux:
    def __init__(self, tmp_path: Path):
        self.socket = str(tmp_path / "tmux.sock")
        self.dir = tmp_path

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def start(self, width: int, command: str) -> None:
        env = f"PYTHONPATH={ROOT} TERM=xterm-256color"
        self("-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", str(width), "-y", "30",
             f"cd {self.dir} && env {env} {command}; sleep 120")

    def screen(self) -> list[str]:
        return [line.rstrip() for line in self("capture-pane", "-p", "-t", "t").splitlines()]

    def step(self, name: str) -> None:
        deadline = time.monotonic() + 30
        while not (self.dir / f"{name}.reached").exists():
            assert time.monotonic() < deadline, f"driver never reached {name}: {self.screen()}"
            time.sleep(0.02)
        time.sleep(0.2)      # the terminal has drawn what was written

    def go(self, name: str) -> None:
        (self.dir / f"{name}.go").touch()

    def kill(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


@pytest.fixture
def tmux(tmp_path):
    terminal = Tmux(tmp_path)
    try:
        yield terminal
    finally:
        terminal.kill()


def layer_rows(screen: list[str]) -> list[str]:
    return [line for line in screen if line.strip()]


def assert_clean(screen: list[str], width: int, status: str) -> list[str]:
    """Above the block only the driver's first line; one line per layer, none wider than the terminal.

    A shrinking window reflows the rows above the cursor (tmux, VTE) and pushes the top ones
    into the scrollback: the first line may have gone there, but no fragment may stay in view.
    """
    rows = layer_rows(screen)
    start = 1 if rows[0] == "before the progress" else 0
    block = rows[start:start + 3]
    assert [line.split(":")[0] for line in block] == LAYERS, screen
    assert all(status in line for line in block), screen
    assert all(len(line) < width for line in rows), screen
    return rows[start + 3:]


@pytest.mark.parametrize("width", [50, 120])
def test_progress_fits_the_terminal_and_is_redrawn_on_resize(tmux, width):
    driver = tmux.dir / "driver.py"
    driver.write_text(DRIVER)
    tmux.start(width, f"{sys.executable} {driver}")
    tmux.step("wide")
    assert layer_rows(tmux.screen())[0] == "before the progress"
    rest = assert_clean(tmux.screen(), width, "Extracting")
    assert rest == []
    block = layer_rows(tmux.screen())[1:4]
    assert all("/s" in line and "left" in line for line in block) or width < 60, block   # rate, time left
    if width >= 120:
        assert "[" in block[0] and "30.0MB/120.0MB" in block[0]
    # The window changes size under the live block: reflowed rows must not stay on screen.
    other = 50 if width == 120 else 120
    tmux("resize-window", "-t", "t", "-x", str(other))
    tmux.go("wide")
    tmux.step("narrow")
    assert assert_clean(tmux.screen(), other, "Extracting") == []
    tmux.go("narrow")
    tmux.step("end")
    rest = assert_clean(tmux.screen(), other, "Pull complete")
    assert rest == ["DONE"]
    tmux.go("end")


def test_unpack_under_a_50_column_terminal_leaves_one_line_per_layer(tmux, tmp_path):
    image = images.build(tmp_path / "image.tar", layers=[images.BASE, images.INSTALL, images.CHANGES])
    tmux.start(50, f"{sys.executable} -m unionfs unpack {image} --store {tmp_path / 'store'}")
    deadline = time.monotonic() + 60
    while not any(line.startswith("Unpacked") for line in tmux.screen()):
        assert time.monotonic() < deadline, tmux.screen()
        time.sleep(0.1)
    rows = layer_rows(tmux.screen())
    layers = [line for line in rows if ": Pull complete" in line]
    assert len(layers) == 3 and len({line.split(":")[0] for line in layers}) == 3, rows
    assert all(len(line) < 50 for line in layers), rows
    assert not any("Extracting" in line or "Verifying" in line for line in rows), rows
    assert os.path.isdir(tmp_path / "store" / "layers")
