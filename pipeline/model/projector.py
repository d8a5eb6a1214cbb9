"""The ``mm_projector``: maps video feature rows ``(N, D_vision)`` to LLM embeddings ``(N, D_llm)``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

PROJECTORS = ("linear", "mlp2x_gelu")


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """An ``mm_projector`` as LLaVA names them (``llava/model/multimodal_projector/builder.py``).

    ``linear``: one ``nn.Linear(in_dim, out_dim)`` (LLaVA-1, Video-ChatGPT). ``mlp2x_gelu``: Linear, GELU,
    Linear (LLaVA-1.5, VideoChat-Flash, E.T. Chat). Parameter names match LLaVA's checkpoints (``weight``/``bias``;
    ``0.*`` and ``2.*`` for the MLP).

    Raises:
        ValueError: unknown ``kind``.
    """
    from torch import nn  # here, so that the workflow can read PROJECTORS without importing torch

    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    raise ValueError(f"unknown mm_projector type {kind!r}; known: {PROJECTORS}")
