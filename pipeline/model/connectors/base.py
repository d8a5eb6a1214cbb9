"""The connector interface (see :mod:`pipeline.model.connectors`)."""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    """Maps each visual's vision tokens to LLM embeddings.

    A visual's tokens come as rows ``(N, D)`` with a layout ``(T, S)``: T frames of S tokens each (N = T * S), or
    ``T = 0`` when the rows are not per frame (Video-ChatGPT's T temporal + S spatial pooled rows).

    Attributes:
        needs_query: the connector reads each visual's question (E.T. Chat's Q-Former): :meth:`project` gets
            ``queries``, tokenized by the connector's own tokenizer (:func:`pipeline.model.qformer.qformer_tokenizer`).
        PARTS: the sub-parts of the connector a stage can train separately (``train.connector`` as a list), by
            parameter name (:meth:`part`).
    """

    needs_query: bool = False
    PARTS: tuple[str, ...] = ("projector",)

    def num_tokens(self, frames: int, patches: int, rows: int) -> int:
        """n, the LLM positions of a visual of ``rows`` rows laid out as ``frames`` x ``patches`` (default: one
        a row).

        Raises:
            ValueError: the connector cannot read that layout.
        """
        return rows

    def project(self, rows: torch.Tensor, layouts: list[tuple[int, int]],
                queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``(sum N_i, D)`` rows of a batch's visuals, in order, with each visual's ``(T_i, S_i)`` ->
        ``(sum n_i, hidden)`` embeddings in the same order (default: row by row, one call for the batch).

        Args:
            queries: None, or ``(input_ids, attention_mask)``, both ``(K, Lq)`` int64: each of the K visuals'
                question, right-padded (read by connectors that :attr:`needs_query`, ignored by the others).
        """
        return self(rows)

    def part(self, name: str) -> str:
        """The part (one of :attr:`PARTS`) of the parameter ``name`` (relative to the connector; default: every
        parameter is ``projector``).

        Raises:
            ValueError: ``name`` is not a parameter of the connector.
        """
        if name not in dict(self.named_parameters()):
            raise ValueError(f"{type(self).__name__} has no parameter {name!r}")
        return "projector"
