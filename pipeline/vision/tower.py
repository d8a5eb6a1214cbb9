"""The vision tower interface: frames of one video in, patch tokens of one block out.

Every tower family (:mod:`pipeline.vision.clip`, :mod:`pipeline.vision.umt`, :mod:`pipeline.vision.multichannel_clip`,
:mod:`pipeline.vision.eva`) is a :class:`VisionTower`. The same module serves both paths of a stage: the features
stage runs it ahead of training (cached vision, :mod:`pipeline.features.extract`), and an online stage runs it
inside the training step (:class:`pipeline.model.video_llm.VideoLLM`), frozen, fully trained or with LoRA; so both
give the same tokens for the same frames.
"""

from __future__ import annotations

import torch
from torch import nn


class VisionTower(nn.Module):
    """A vision tower: ``(T, 3, H, W)`` normalised frames of one video -> ``(T', S, D)`` patch tokens (no CLS) of the
    selected block.

    Attributes:
        dim: D, the width of the tokens.
        grid: ``(rows, columns)`` of patches per output frame; S = rows * columns.
        clip_frames: how many consecutive frames the tower reads as one input (CLIP: 1; UMT-L: 4, VideoChat-Flash's
            ``mm_local_num_frames``; the SSv2 fork's multi-channel CLIP: its 16 segments). A video's frame count is a
            multiple of it, except a still image (one frame), which every tower reads alone.
        image_size: ``(H, W)`` pixels of the input frames.
        mean, std: RGB normalisation of pixels scaled to [0, 1].
        heads: attention heads of the tower's blocks.
    """

    dim: int
    grid: tuple[int, int]
    clip_frames: int = 1
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    heads: int

    @property
    def num_patches(self) -> int:
        """Patches per output frame, S."""
        return self.grid[0] * self.grid[1]

    def out_frames(self, frames: int) -> int:
        """T', the output frames of ``frames`` input frames (T' = T, except towers that fold frames into channels)."""
        return frames

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - the interface
        """``(T, 3, H, W)`` normalised frames, in the tower's dtype -> ``(T', S, D)`` tokens, same dtype."""
        raise NotImplementedError
