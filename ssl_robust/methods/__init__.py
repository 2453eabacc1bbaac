"""Self-supervised methods, one file each, and the ``METHODS`` registry."""

from ssl_robust.methods.byol import BYOL
from ssl_robust.methods.simclr import SimCLR

METHODS: dict[str, type] = {"byol": BYOL, "simclr": SimCLR}

__all__ = ["BYOL", "METHODS", "SimCLR"]
