"""``tome16_mlp_hd64``, VideoChat-Flash's connector: token merging (ToMe, Bolya et al. 2023) of each clip of
frames down to 16 tokens a frame, then LLaVA's ``mlp2x_gelu``.

From OpenGVLab/VideoChat-Flash ``llava-train_videochat/llava/model/multimodal_projector/tome16_mlp_hd64.py``:

- a video's frames are read in clips of ``mm_local_num_frames`` = 4 (``llava_arch.py`` ``encode_video``: the
  clip's tokens ``(4 * S, D)`` are merged together), down to ``16 * 4`` tokens a clip (``forward``:
  ``num_tome_tokens = 16 * num_frames``); an image (one frame, ``compress=False``) goes down to 64 tokens;
- ``merge_tokens``: repeated bipartite soft matching, each round removing at most half the tokens, until the target
  is reached; the similarity metric is the tokens averaged over the attention heads' channel groups
  (``x.reshape(b, p, head, dim).mean(2)``), cosine-normalised; merged tokens are size-weighted means
  (``merge_wavg``);
- the MLP is ``mlp.0`` (Linear D -> hidden), GELU, ``mlp.2`` (Linear hidden -> hidden): parameter names as its
  checkpoints' ``mm_projector.mlp.*``, so a released connector loads.

Upstream takes the head count from the vision tower's config (16 for UMT-L); here it is ``D // 64`` (the head
width of 64 of UMT-L and CLIP ViT-L/14: 16 heads at D = 1024), so that cached features of any tower merge as the
online tower's do. Upstream asserts a clip holds more tokens than the target; here a clip that holds no more is
kept whole (tiny test towers).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.connectors.base import Connector

HEAD_WIDTH = 64


def _merge_round(x: torch.Tensor, size: torch.Tensor, r: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching: the ``r`` tokens of the even positions most similar to an odd-position
    token are averaged into it (weighted by ``size``, the tokens each already stands for).

    Args:
        x: ``(B, P, C)`` tokens; size: ``(B, P, 1)``; r: tokens to remove, at most ``P // 2``.

    Returns:
        ``(B, P - r, C)`` tokens and their sizes: the unmerged even tokens (most similar last), then the odd ones.
    """
    b, p, c = x.shape
    with torch.no_grad():
        metric = x.reshape(b, p, heads, c // heads).mean(2)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)[..., None]
        kept, merged = order[:, r:], order[:, :r]
        dst = best_dst[..., None].gather(1, merged)

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, odd = t[:, ::2], t[:, 1::2]
        width = t.shape[-1]
        unmerged = src.gather(1, kept.expand(-1, -1, width))
        moving = src.gather(1, merged.expand(-1, -1, width))
        return torch.cat([unmerged, odd.scatter_add(1, dst.expand(-1, -1, width), moving)], dim=1)

    summed, size = merge(x * size), merge(size)
    return summed / size, size


def merge_tokens(x: torch.Tensor, target: int, heads: int) -> torch.Tensor:
    """``(B, P, C)`` -> ``(B, target, C)`` by rounds of :func:`_merge_round`, each removing at most half the
    tokens (upstream's ``merge_tokens`` schedule); ``x`` is returned as it is when ``P <= target``."""
    p = x.shape[1]
    size = torch.ones_like(x[..., :1])
    while p > target:
        r = min(p - target, p // 2)
        x, size = _merge_round(x, size, r, heads)
        p = x.shape[1]
    return x


class ToMeConnector(Connector):
    """``tome16_mlp_hd64``: ``(T * S, D)`` per-frame tokens of one visual -> ``(n, hidden)``, n = 16 a frame of a
    video (T a multiple of 4) or 64 for an image (T = 1).

    Args:
        in_dim: D; out_dim: the LLM's hidden size.
        clip_frames: frames merged together (``mm_local_num_frames``: 4).
        frame_tokens: tokens a frame keeps (16); image_tokens: tokens an image keeps (64).
    """

    def __init__(self, in_dim: int, out_dim: int, clip_frames: int = 4, frame_tokens: int = 16,
                 image_tokens: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.clip_frames, self.frame_tokens, self.image_tokens = clip_frames, frame_tokens, image_tokens
        self.heads = max(1, in_dim // HEAD_WIDTH)

    def _groups(self, frames: int, patches: int) -> tuple[int, int, int]:
        """``(clips, tokens a clip, target a clip)`` of a visual of ``frames`` x ``patches``."""
        if frames < 1:
            raise ValueError("tome16_mlp_hd64 reads per-frame tokens (features.pooling: frames, spatial_pool: 1), "
                             "not pooled rows")
        if frames == 1:
            return 1, patches, min(patches, self.image_tokens)
        if frames % self.clip_frames:
            raise ValueError(f"tome16_mlp_hd64 merges clips of {self.clip_frames} frames; {frames} frames are not "
                             "a whole number of clips")
        per_clip = self.clip_frames * patches
        return frames // self.clip_frames, per_clip, min(per_clip, self.frame_tokens * self.clip_frames)

    def num_tokens(self, frames: int, patches: int, rows: int) -> int:
        clips, _, target = self._groups(frames, patches)
        return clips * target

    def project(self, rows: torch.Tensor, layouts: list[tuple[int, int]],
                queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        out, start = [], 0
        for frames, patches in layouts:
            clips, per_clip, target = self._groups(frames, patches)
            x = rows[start:start + clips * per_clip].reshape(clips, per_clip, rows.shape[-1])
            start += clips * per_clip
            out.append(merge_tokens(x, target, self.heads).reshape(-1, rows.shape[-1]))
        merged = torch.cat(out) if out else rows[:0]
        return self.mlp(merged)

    def forward(self, rows: torch.Tensor, layout: tuple[int, int]) -> torch.Tensor:
        """One visual: ``(T * S, D)`` -> ``(n, hidden)``."""
        return self.project(rows, [layout])
