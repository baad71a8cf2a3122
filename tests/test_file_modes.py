"""Files KeyFace writes get the permissions of a normally created file (0o666 minus the umask), not
the private 0600 of a temporary file, while still being written atomically."""

import os
import stat

import numpy as np
import pytest
import torch

from keyface._files import create_temp_beside
from keyface.checkpoints import convert_to_safetensors
from keyface.video_io import Mp4Writer



@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    # the umask is process-wide: set for the test, restored after it (tests run one at a time)
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_temp_file_mode_and_uniqueness(tmp_path, umask):
    a = create_temp_beside(tmp_path / "out.mp4", ".part")
    b = create_temp_beside(tmp_path / "out.mp4", ".part")
    assert a != b and os.path.basename(a).startswith(".out.mp4.") and a.endswith(".part")
    assert _mode(a) == _mode(b) == 0o666 & ~umask


def test_converted_safetensors_mode(tmp_path, umask):
    src = tmp_path / "w.pt"
    torch.save({"x": torch.ones(2)}, src)
    dst = convert_to_safetensors(src, tmp_path / "w.safetensors")
    assert _mode(dst) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w.safetensors"]  # no temporary left


def test_mp4_mode(tmp_path, umask):
    out = tmp_path / "out.mp4"
    with Mp4Writer(out, 16, 16, fps=25, num_frames=3) as w:
        w.write(np.zeros((3, 16, 16, 3), dtype=np.float32))
    assert _mode(out) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
