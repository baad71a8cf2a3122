"""The default layer constructors.

Every network in this package builds its layers through an ``operations`` namespace instead of
``torch.nn`` directly, so that a host application can inject its own layer classes with the same
signatures (ComfyUI's ``comfy.ops.manual_cast`` for partial offload, weight casting and per-op
cancel). ``None`` anywhere means these plain torch layers.
"""

from types import SimpleNamespace

from torch import nn

TORCH_OPS = SimpleNamespace(
    Linear=nn.Linear,
    Conv1d=nn.Conv1d,
    Conv2d=nn.Conv2d,
    Conv3d=nn.Conv3d,
    GroupNorm=nn.GroupNorm,
    LayerNorm=nn.LayerNorm,
)


def resolve(operations):
    """Return ``operations`` or the torch defaults; fill in any class the namespace lacks."""
    if operations is None:
        return TORCH_OPS
    if all(hasattr(operations, k) for k in vars(TORCH_OPS)):
        return operations
    return SimpleNamespace(**{k: getattr(operations, k, torch_cls) for k, torch_cls in vars(TORCH_OPS).items()})
