"""The connector interface (see :mod:`pipeline.model.connectors`)."""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    """Maps each visual's vision tokens to LLM embeddings.

    A visual's tokens come as rows ``(N, D)`` with a layout ``(T, S)``: T frames of S tokens each (N = T * S), or
    ``T = 0`` when the rows are not per frame (Video-ChatGPT's T temporal + S spatial pooled rows).
    """

    def num_tokens(self, frames: int, patches: int, rows: int) -> int:
        """n, the LLM positions of a visual of ``rows`` rows laid out as ``frames`` x ``patches`` (default: one
        a row).

        Raises:
            ValueError: the connector cannot read that layout.
        """
        return rows

    def project(self, rows: torch.Tensor, layouts: list[tuple[int, int]]) -> torch.Tensor:
        """``(sum N_i, D)`` rows of a batch's visuals, in order, with each visual's ``(T_i, S_i)`` ->
        ``(sum n_i, hidden)`` embeddings in the same order (default: row by row, one call for the batch)."""
        return self(rows)
