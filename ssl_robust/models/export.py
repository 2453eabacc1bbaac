"""Encoder export: ``encoder.safetensors`` + ``encoder.json``.

Later phases rebuild the backbone from the JSON and load the weights; they never unpickle a
training checkpoint and never need the pretraining method's code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from ssl_robust.files import save_safetensors, unfinished_note, write_text_atomic
from ssl_robust.models.backbones import Encoder, build_backbone


@dataclass
class EncoderMeta:
    backbone: str
    width: int
    feat_dim: int
    image_size: int
    mean: list[float]
    std: list[float]
    num_classes: int = 0
    extra: dict[str, object] = field(default_factory=dict)


def export_encoder(encoder: Encoder, meta: EncoderMeta, folder: str | Path) -> Path:
    """Write ``encoder.safetensors`` and ``encoder.json`` into ``folder`` (atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "encoder.safetensors"
    # Without torch.compile's wrapper prefix: the weights load into a plain encoder.
    state = {
        k.replace("_orig_mod.", ""): v.detach().cpu().contiguous()
        for k, v in encoder.state_dict().items()
    }
    save_safetensors(weights, state)
    write_text_atomic(folder / "encoder.json", json.dumps(asdict(meta), indent=2))
    return weights


def load_encoder_meta(folder: str | Path) -> EncoderMeta:
    """The description of an exported encoder (``encoder.json``), without its weights."""
    info = Path(folder) / "encoder.json"
    if not info.is_file():
        raise FileNotFoundError(f"no encoder.json in {str(folder)!r}")
    return EncoderMeta(**json.loads(info.read_text()))


def load_encoder(folder: str | Path) -> tuple[Encoder, EncoderMeta]:
    """Rebuild an exported encoder from a run directory (or the folder holding the files)."""
    folder = Path(folder)
    info, weights = folder / "encoder.json", folder / "encoder.safetensors"
    if not info.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"no exported encoder in {str(folder)!r}: expected encoder.json and "
            f"encoder.safetensors (written at the end of pretraining){unfinished_note(folder)}"
        )
    meta = load_encoder_meta(folder)
    encoder = build_backbone(meta.backbone, meta.width)
    try:
        encoder.load_state_dict(load_file(str(weights)))
    except RuntimeError as err:
        raise ValueError(
            f"the weights in {str(weights)!r} do not fit the backbone encoder.json names "
            f"({meta.backbone!r}, width {meta.width}): {str(err).splitlines()[0]}"
        ) from None
    if encoder.feat_dim != meta.feat_dim or meta.image_size < 1:
        raise ValueError(
            f"encoder.json in {str(folder)!r} says feat_dim {meta.feat_dim} and image size "
            f"{meta.image_size}, but {meta.backbone!r} has feat_dim {encoder.feat_dim}"
        )
    return encoder, meta
