"""Self-supervised methods, one file each, and the ``METHODS`` registry."""

from torch import nn

from ssl_robust.methods.byol import BYOL
from ssl_robust.methods.simclr import SimCLR

METHODS: dict[str, type] = {"byol": BYOL, "simclr": SimCLR}

# The encoders a method runs in every training step: the backbone, and BYOL's momentum copy
# (a deep copy made before compilation would otherwise run eagerly).
BACKBONES = ("backbone", "backbone_momentum")


def compile_backbones(method: nn.Module) -> None:
    """``torch.compile`` each of the method's encoders in place (their state_dict keys, and so
    checkpoints and the exported encoder, stay the same)."""
    for name in BACKBONES:
        module = getattr(method, name, None)
        if isinstance(module, nn.Module):
            module.compile()


__all__ = ["BACKBONES", "BYOL", "METHODS", "SimCLR", "compile_backbones"]
