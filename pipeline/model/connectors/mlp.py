"""Row-wise connectors as LLaVA names them (``llava/model/multimodal_projector/builder.py``): n = rows."""

from __future__ import annotations

from torch import nn

from pipeline.model.connectors.base import Connector


class LinearConnector(nn.Linear, Connector):
    """``linear``: one ``nn.Linear(in_dim, out_dim)`` (LLaVA-1, Video-ChatGPT); parameters ``weight``, ``bias``.
    ``(N, D)`` -> ``(N, hidden)``."""


class MLPConnector(nn.Sequential, Connector):
    """``mlp2x_gelu``: Linear, GELU, Linear (LLaVA-1.5, E.T. Chat, the SSv2 fork); parameters ``0.*`` and ``2.*``.
    ``(N, D)`` -> ``(N, hidden)``."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
