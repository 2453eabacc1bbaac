"""Classifier export: ``classifier.safetensors`` + ``classifier.json`` in a fine-tuning run.

The JSON says how to rebuild the module (the encoder's :class:`EncoderMeta`, the number of
classes) and which data it was trained for, so the evaluation phase can rebuild the test
split without the fine-tuning code or a training checkpoint.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor

from ssl_robust.files import save_safetensors, unfinished_note, write_text_atomic
from ssl_robust.finetune.model import Classifier
from ssl_robust.models.backbones import build_backbone
from ssl_robust.models.export import EncoderMeta


def save_classifier(
    classifier: Classifier, encoder_meta: EncoderMeta, folder: str | Path, **info: Any
) -> Path:
    """Write the classifier and its description; ``info`` (JSON-serialisable) is kept as is,
    e.g. ``classes=[...]``, ``data={"name": ..., "root": ..., "image_size": ...}``, ``mode``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / "classifier.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in classifier.state_dict().items()}
    save_safetensors(weights, state)
    # The normalisation the classifier applies (data.mean/std may override the encoder's).
    applied = {
        "mean": _applied(classifier.mean, encoder_meta.mean),
        "std": _applied(classifier.std, encoder_meta.std),
    }
    meta = {
        "encoder": asdict(encoder_meta) | applied,
        "num_classes": classifier.num_classes,
        **info,
    }
    write_text_atomic(folder / "classifier.json", json.dumps(meta, indent=2))
    return weights


def _applied(buffer: Tensor, declared: list[float]) -> list[float]:
    """The values a normalisation buffer holds: ``declared`` when they are those (up to the
    buffer's float32 rounding), else the buffer's own."""
    values = buffer.flatten().tolist()
    same = len(values) == len(declared) and all(
        math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(values, declared)
    )
    return [float(v) for v in declared] if same else values


def load_classifier(folder: str | Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a classifier exported by :func:`save_classifier` (weights on the CPU)."""
    folder = Path(folder)
    desc, weights = folder / "classifier.json", folder / "classifier.safetensors"
    if not desc.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"no exported classifier in {str(folder)!r}: expected classifier.json and "
            f"classifier.safetensors (written at the end of fine-tuning)"
            f"{unfinished_note(folder)}"
        )
    meta = json.loads(desc.read_text())
    enc_meta = EncoderMeta(**meta["encoder"])
    encoder = build_backbone(enc_meta.backbone, enc_meta.width)
    state = load_file(str(weights))
    # Built with the stored normalisation, whose length (1 or 3 values) the buffers take.
    mean = state["mean"].flatten().tolist() if "mean" in state else enc_meta.mean
    std = state["std"].flatten().tolist() if "std" in state else enc_meta.std
    classifier = Classifier(encoder, int(meta["num_classes"]), mean, std)
    classifier.load_state_dict(state)
    return classifier, meta
