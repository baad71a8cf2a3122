"""Generate tests/fixtures/checkpoints/deepspeed_omegaconf_metadata.pt: a DeepSpeed model-states file
whose metadata beside the weights holds the objects real training runs leave there (an OmegaConf
config, a pathlib path, torch's TorchVersion, argparse.Namespace). torch's weights-only loader refuses
such a file; tests/test_checkpoints.py checks that KeyFace's restricted fallback reads its weights
without importing omegaconf.

Run it with a Python that has omegaconf (not a test dependency), e.g.:

    python -m pip install --target /tmp/omegaconf_pkg omegaconf
    PYTHONPATH=/tmp/omegaconf_pkg .venv/bin/python tests/tools/make_metadata_checkpoint.py

The weights are ``_forward_module.model.w`` = arange(6).reshape(2, 3) and ``..b`` = [0.5, -1.5].
"""

import argparse
from pathlib import Path

import torch
from omegaconf import OmegaConf

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints" / "deepspeed_omegaconf_metadata.pt"


def main():
    cfg = OmegaConf.create({"model": {"params": {"lr": 1e-4, "channel_mult": [1, 2, 4, 4], "name": "keyframe"}},
                            "data": {"fps": 25, "flags": [True, False], "none": None}})
    obj = {
        "module": {"_forward_module.model.w": torch.arange(6.0).reshape(2, 3),
                   "_forward_module.model.b": torch.tensor([0.5, -1.5])},
        "ds_version": "0.14.0",
        "hyper_parameters": cfg,
        "ckpt_dir": Path("/data/runs/keyframe/checkpoints"),
        "torch_version": torch.__version__,  # a torch.torch_version.TorchVersion
        "args": argparse.Namespace(seed=23, config=Path("configs/keyframe.yaml")),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
