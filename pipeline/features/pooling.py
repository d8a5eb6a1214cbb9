"""Pooling of per-frame patch tokens into the video tokens an ``mm_projector`` reads."""

from __future__ import annotations

import torch

POOLINGS = ("videochatgpt",)


def videochatgpt_pool(tokens: torch.Tensor) -> torch.Tensor:
    """Video-ChatGPT's spatio-temporal pooling.

    Temporal tokens are the mean over patches of each frame, spatial tokens the mean over frames of each patch
    (Maaz et al. 2023, Video-ChatGPT, ``scripts/save_spatio_temporal_clip_features.py``:
    ``get_spatio_temporal_features``). With CLIP ViT-L/14 at 224 px and 100 frames: ``(100 + 256, 1024)``.

    Args:
        tokens: ``(T, S, D)`` patch tokens of T frames with S patches each, without CLS, any float dtype.

    Returns:
        ``(T + S, D)``, temporal rows first, in ``tokens``' dtype.

    Raises:
        ValueError: ``tokens`` is not 3-dimensional.
    """
    if tokens.dim() != 3:
        raise ValueError(f"expected (T, S, D) patch tokens, got shape {tuple(tokens.shape)}")
    return torch.cat([tokens.mean(dim=1), tokens.mean(dim=0)], dim=0)


def pool(tokens: torch.Tensor, method: str) -> torch.Tensor:
    """Apply the pooling named ``method`` (one of ``POOLINGS``) to ``(T, S, D)`` patch tokens.

    Raises:
        ValueError: unknown ``method``.
    """
    if method == "videochatgpt":
        return videochatgpt_pool(tokens)
    raise ValueError(f"unknown pooling {method!r}; known: {POOLINGS}")
