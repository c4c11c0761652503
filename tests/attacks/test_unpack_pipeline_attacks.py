"""Attacks on the unpack pipeline: the read-ahead thread, the inflater and the fast header parse."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# VmHWM is this process's own peak; ru_maxrss would carry over the forking pytest's through exec.
UNPACK_AND_REPORT_PEAK = """
import re, sys
from unionfs.image import open_layer_tars
from unionfs.store import LayerStore
layers = LayerStore(sys.argv[2]).unpack_image(open_layer_tars([sys.argv[1]]), jobs=1)
with open("/proc/self/status") as status:
    peak = re.search(r"VmHWM:\\s+(\\d+) kB", status.read()).group(1)
print(layers[0].meta["tar_size"], peak)
"""


def test_a_gzip_bomb_after_the_tar_end_is_hashed_in_bounded_memory(tmp_path):
    """A layer whose tar ends early and whose stream goes on with 512 MiB of zeros (0.5 MB
    compressed): the read-ahead thread must not race ahead and hold it, and the drain that
    hashes it must go chunk by chunk. Peak memory stays far below the bomb's size."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("small")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"small"))
    bomb_size = 512 << 20
    blob = tmp_path / "bomb.tar.gz"
    with gzip.open(blob, "wb", compresslevel=9) as compressor:
        compressor.write(buffer.getvalue())
        zeros = bytes(1 << 20)
        for _ in range(bomb_size >> 20):
            compressor.write(zeros)
    assert blob.stat().st_size < 1 << 20
    result = subprocess.run([sys.executable, "-c", UNPACK_AND_REPORT_PEAK, str(blob), str(tmp_path / "store")],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    tar_size, peak_kib = map(int, result.stdout.split())
    assert tar_size == len(buffer.getvalue()) + bomb_size      # every byte was read and hashed
    assert peak_kib < 200 * 1024, f"peak RSS {peak_kib} KiB while draining a {bomb_size >> 20} MiB bomb"
