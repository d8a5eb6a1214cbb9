"""Pooling of per-frame patch tokens into the video tokens an ``mm_projector`` reads: always a 2-D ``(N, D)``
float16 array, whose layout the store's attributes record."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

POOLINGS = ("videochatgpt", "frames")


def videochatgpt_pool(tokens: torch.Tensor, temporal_tokens: int | None = None) -> torch.Tensor:
    """Video-ChatGPT's spatio-temporal pooling.

    Temporal tokens are the mean over patches of each frame, zero rows appended up to ``temporal_tokens``; spatial
    tokens are the mean over the (real) frames of each patch. As the original, the tokens are rounded to float16
    before the means (Maaz et al. 2023, Video-ChatGPT, ``scripts/save_spatio_temporal_clip_features.py``:
    ``get_spatio_temporal_features``). With CLIP ViT-L/14 at 224 px and 100 frames: ``(100 + 256, 1024)``.

    Args:
        tokens: ``(T, S, D)`` patch tokens of T frames with S patches each, without CLS.
        temporal_tokens: pad the temporal rows to this many (Video-ChatGPT: 100); None: T rows.

    Returns:
        ``(max(T, temporal_tokens) + S, D)`` float16, temporal rows first.

    Raises:
        ValueError: ``tokens`` is not 3-dimensional.
    """
    import torch

    if tokens.dim() != 3:
        raise ValueError(f"expected (T, S, D) patch tokens, got shape {tuple(tokens.shape)}")
    x = tokens.to(torch.float16).float()
    temporal = x.mean(dim=1)
    if temporal_tokens is not None and temporal_tokens > len(temporal):
        temporal = torch.cat([temporal, temporal.new_zeros(temporal_tokens - len(temporal), temporal.shape[1])])
    return torch.cat([temporal, x.mean(dim=0)]).to(torch.float16)


def frame_tokens(tokens: torch.Tensor, grid: tuple[int, int], spatial_pool: int = 1) -> torch.Tensor:
    """Per-frame tokens for recipes that keep every frame (E.T. Chat, VideoChat-Flash), optionally average-pooled
    over ``spatial_pool`` x ``spatial_pool`` patches (2: a 16 x 16 grid becomes 8 x 8).

    Args:
        tokens: ``(T, S, D)`` with S = ``grid[0] * grid[1]``, patches in row-major order.

    Returns:
        ``(T * S', D)`` float16, frame by frame, S' = ``ceil(grid[0] / k) * ceil(grid[1] / k)``.

    Raises:
        ValueError: S does not match ``grid``.
    """
    import torch

    frames, patches, dim = tokens.shape
    if patches != grid[0] * grid[1]:
        raise ValueError(f"{patches} patches per frame do not make a {grid[0]} x {grid[1]} grid")
    if spatial_pool > 1:
        image = tokens.reshape(frames, grid[0], grid[1], dim).permute(0, 3, 1, 2)
        image = torch.nn.functional.avg_pool2d(image, spatial_pool, ceil_mode=True)
        tokens = image.permute(0, 2, 3, 1).reshape(frames, -1, dim)
    return tokens.reshape(-1, dim).to(torch.float16)
