"""Connectors (LLaVA's ``mm_projector``): one visual's vision tokens -> the n LLM embeddings that take its place.

One interface (:class:`~pipeline.model.connectors.base.Connector`), one module per family:
:mod:`~pipeline.model.connectors.mlp` (``linear``, ``mlp2x_gelu``: row by row, n = rows) and
:mod:`~pipeline.model.connectors.tome` (``tome16_mlp_hd64``, VideoChat-Flash's token merging: n = 16 a frame).
The dataset, the length fitting of records and generation ask the connector for n
(:meth:`~pipeline.model.connectors.base.Connector.num_tokens`); nothing assumes n equals the cached rows.
"""

from __future__ import annotations

CONNECTORS = ("linear", "mlp2x_gelu", "tome16_mlp_hd64")


def build_connector(kind: str, in_dim: int, out_dim: int):
    """A connector of ``kind`` (one of :data:`CONNECTORS`) from ``in_dim``-wide vision tokens to ``out_dim``
    (the LLM's hidden size), with the parameter names of the original checkpoints (so that LLaVA's, Video-ChatGPT's
    and VideoChat-Flash's released ``mm_projector`` weights load).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind in ("linear", "mlp2x_gelu"):
        from pipeline.model.connectors.mlp import LinearConnector, MLPConnector

        return LinearConnector(in_dim, out_dim) if kind == "linear" else MLPConnector(in_dim, out_dim)
    if kind == "tome16_mlp_hd64":
        from pipeline.model.connectors.tome import ToMeConnector

        return ToMeConnector(in_dim, out_dim)
    raise ValueError(f"unknown connector (mm_projector_type) {kind!r}; known: {CONNECTORS}")
