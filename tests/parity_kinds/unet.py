"""Parity runner for kind ``unet``: the raw VideoUNet forward (KINDS.md, spec 4.4).

The network is built from ``config.network_config.params``, loaded strictly from the
``config.weights_prefix`` keys of ``files.checkpoint`` and called with the case's inputs.
"""

from keyface.checkpoints import read_state_dict
from keyface.config import UNetConfig
from keyface.unet import VideoUNet

from . import case_file, case_inputs, register


@register("unet")
def run_unet(case, folder):
    cfg = case["config"]
    net = VideoUNet(UNetConfig.from_original(cfg["network_config"]["params"]))
    prefix = cfg.get("weights_prefix", "model.diffusion_model.")
    state = read_state_dict(case_file(case, folder, "checkpoint"))
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    net.load_state_dict(weights, strict=True)
    net.eval()
    inp = case_inputs(case, folder)
    out = net(
        inp["x"],
        inp["timesteps"],
        inp["context"],
        y=inp.get("y"),
        num_video_frames=int(cfg.get("num_video_frames", 14)),
    )
    return {"out": out}
