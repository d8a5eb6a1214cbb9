"""E.T. Chat's timestamp matching (Liu et al., NeurIPS 2024; PolyU-ChenLab/ETBench ``etchat/model/etchat_arch.py``):
a timestamp is not written as text but as the vocabulary token ``<vid>``, whose hidden state is matched against
the video's frame tokens; the best-matching frame's time is the timestamp.

- **Heads** (``etchat_arch.py:96-103``): ``frm_head`` reads the frame tokens' last-layer states before the final
  norm (``:405``, the norm's input), ``vid_head`` the second-to-last layer's output (``:406``, the last layer's
  input) at the position that predicts ``<vid>``; both ``LayerNorm, Linear(h, h / 2), GELU, Linear(h / 2, h)``.
- **Loss** (``:421-449``): similarities ``vid @ frm.T / sqrt(h)`` against the soft targets ``alpha^-|i - t|`` (not
  normalised, as there: ``F.cross_entropy`` with probability targets), averaged over the samples that have
  ``<vid>`` answers, added to the language-model loss; a batch without any adds ``0 *`` the heads' output, so
  the heads stay in every step's graph (DDP, ZeRO).
- **Source frames** (``:242-252``, ``:268-278``): each ``<vid>`` input (in the question, and under teacher forcing
  in the answer) gets the connector's embedding of its frame added; at generation, each emitted ``<vid>`` gets
  the matched frame's (``:377-381``).
- **Bidirectional frames** (``:84-90``, ``--bi_attention``): the frame tokens of a video attend to each other both
  ways (a 4D mask: SDPA or eager attention, not flash-attn).
- **The output row**: ``<vid>`` is a token added to the tokenizer; its input row is the model's
  ``extra_embeddings`` (as every added token's) and its output row is ``vid_output`` here, a ``Linear(h, 1)``
  whose logit is appended to the LLM's, initialised to the mean output row as E.T. Chat does (``train.py:459-465``).
  E.T. Chat trains the whole ``embed_tokens`` and ``lm_head`` in its stage 3; here the LLM's own rows stay as
  they are and only the ``<vid>`` rows train (a recipe difference its header states).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX

MATCH_TOKEN = "<vid>"  # etchat/constants.py:6 DEFAULT_MATCH_TOKEN


def _head(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden // 2), nn.GELU(),
                         nn.Linear(hidden // 2, hidden))


def decoder_parts(llm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(final norm, last decoder layer)`` of a Hugging Face causal LM (PEFT-wrapped or not).

    Raises:
        ValueError: the LLM's decoder has no ``norm`` and ``layers`` (not a Llama-family layout).
    """
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else None
    if decoder is None or not hasattr(decoder, "norm") or not hasattr(decoder, "layers"):
        raise ValueError(f"matching: {type(llm).__name__} has no decoder with norm and layers (Llama, Qwen2, Phi-3 "
                         "and their kind have)")
    return decoder.norm, decoder.layers[-1]


def video_spans(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's video positions as ``(start, count)``, two ``(B,)`` int64 (count 0: no video). A row's video
    positions are one contiguous span (one visual a sample, as E.T. Chat's)."""
    is_video = input_ids == VIDEO_TOKEN_INDEX
    return is_video.int().argmax(1), is_video.sum(1)


def frame_attention_mask(attention_mask: torch.Tensor, input_ids: torch.Tensor, dtype: torch.dtype | None = None
                         ) -> torch.Tensor:
    """The 4D attention mask with each sample's frame tokens attending to each other both ways.

    Args:
        attention_mask: ``(B, L)`` 1 for tokens, 0 for padding.
        input_ids: ``(B, L)`` with ``VIDEO_TOKEN_INDEX`` at the frame positions.
        dtype: None: a boolean mask (True: attend; SDPA); a float dtype: the additive mask (0 or the dtype's
            minimum; eager attention).

    Returns:
        ``(B, 1, L, L)``: causal, no padding keys, plus the frames block.
    """
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
    allowed = causal[None] & attention_mask.bool()[:, None, :]
    is_video = input_ids == VIDEO_TOKEN_INDEX
    allowed = allowed | (is_video[:, :, None] & is_video[:, None, :])
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=input_ids.device)  # a padding row is not empty
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed,
                                                                                      torch.finfo(dtype).min)


class MatchingHead(nn.Module):
    """``frm_head``, ``vid_head`` and the ``<vid>`` output row ``vid_output`` (parameter names E.T. Chat's, for
    the heads).

    Args:
        hidden: the LLM's hidden size h.
        token_id: the id of ``<vid>`` in the stage's tokenizer.
        alpha: base of the soft targets (E.T. Chat ``--alpha 2.0``, ``scripts/train_stage_3.sh``).
        bidirectional_frames: frame tokens attend both ways (``--bi_attention True``).
    """

    def __init__(self, hidden: int, token_id: int, alpha: float = 2.0, bidirectional_frames: bool = True):
        super().__init__()
        self.frm_head, self.vid_head = _head(hidden), _head(hidden)
        self.vid_output = nn.Linear(hidden, 1, bias=False)
        self.token_id, self.alpha, self.bidirectional_frames = token_id, alpha, bidirectional_frames
        self._states: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def capture(self, llm: nn.Module):
        """Context in which the LLM's forward passes record ``prenorm`` (the final norm's input ``(B, L, h)``),
        ``normed`` (its output) and ``penultimate`` (the last decoder layer's input) in ``self.states``."""
        norm, last = decoder_parts(llm)

        def before_norm(module, args):
            self._states["prenorm"] = args[0]

        def after_norm(module, args, output):
            self._states["normed"] = output

        def before_last(module, args, kwargs):
            self._states["penultimate"] = args[0] if args else kwargs["hidden_states"]

        handles = [norm.register_forward_pre_hook(before_norm), norm.register_forward_hook(after_norm),
                   last.register_forward_pre_hook(before_last, with_kwargs=True)]
        try:
            yield self._states
        finally:
            for handle in handles:
                handle.remove()

    @property
    def states(self) -> dict[str, torch.Tensor]:
        """The last captured states (:meth:`capture`)."""
        return self._states

    def logits(self, llm_logits: torch.Tensor) -> torch.Tensor:
        """``(B, L, V)`` LLM logits (of the last L positions of the captured pass) -> ``(B, L, V + 1)`` with the
        ``<vid>`` logit appended as the last column."""
        normed = self._states["normed"][:, -llm_logits.shape[1]:]
        extra = self.vid_output(normed.to(self.vid_output.weight.dtype))
        return torch.cat([llm_logits, extra.to(llm_logits.dtype)], -1)

    def similarities(self, position: torch.Tensor, row: int, start: int, count: int) -> torch.Tensor:
        """``(P, T)`` scaled similarities of the ``vid_head`` states at ``position`` ``(P,)`` of batch row ``row``
        with the ``frm_head`` states of its ``count`` frames from ``start``."""
        dtype = self.vid_output.weight.dtype
        frames = self.frm_head(self._states["prenorm"][row, start:start + count].to(dtype))
        queries = self.vid_head(self._states["penultimate"][row, position].to(dtype))
        return queries @ frames.T / queries.shape[-1] ** 0.5

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, vid_frames: torch.Tensor) -> torch.Tensor:
        """The matching loss of a batch whose forward pass was captured.

        Args:
            input_ids, labels: ``(B, L)`` of the batch (labels unshifted, ``IGNORE_INDEX`` where not trained).
            vid_frames: ``(M,)`` int64, the frame of each ``<vid>`` of ``input_ids`` in row-major order; those
                whose label is ``<vid>`` (the answers') are the targets.

        Returns:
            A scalar: the mean over the samples with targets of their mean soft-target cross-entropy.
        """
        starts, counts = video_spans(input_ids)
        positions = (input_ids == self.token_id).nonzero()
        trained = labels[positions[:, 0], positions[:, 1]] != IGNORE_INDEX
        losses = []
        for row in range(input_ids.shape[0]):
            chosen = (positions[:, 0] == row) & trained
            count = int(counts[row])
            if not chosen.any() or count == 0:
                continue
            targets = vid_frames[chosen].clamp(0, count - 1)
            sim = self.similarities(positions[chosen, 1] - 1, row, int(starts[row]), count)  # the predicting step
            index = torch.arange(count, device=sim.device)
            soft = torch.pow(self.alpha, -(index[None] - targets[:, None]).abs().to(sim.dtype))
            losses.append(F.cross_entropy(sim.float(), soft.float()))
        if losses:
            return torch.stack(losses).mean()
        return sum(p.sum() for p in self.parameters()) * 0.0

    def inject(self, embeds: torch.Tensor, input_ids: torch.Tensor, vid_frames: torch.Tensor | None
               ) -> torch.Tensor:
        """Add to each ``<vid>`` input embedding the embedding of its frame (the video positions of its row).

        Args:
            embeds: ``(B, L, h)`` input embeddings, video positions filled.
            vid_frames: ``(M,)`` int64 frame of each ``<vid>`` in row-major order, -1 for none; None: none.

        Returns:
            ``(B, L, h)``.

        Raises:
            ValueError: ``vid_frames`` does not have one entry per ``<vid>``.
        """
        positions = (input_ids == self.token_id).nonzero()
        if vid_frames is None or not len(positions):
            return embeds
        if len(vid_frames) != len(positions):
            raise ValueError(f"{len(positions)} {MATCH_TOKEN} tokens in input_ids but {len(vid_frames)} frames")
        starts, counts = video_spans(input_ids)
        rows, cols = positions[:, 0], positions[:, 1]
        keep = (vid_frames >= 0) & (counts[rows] > 0)
        rows, cols, frames = rows[keep], cols[keep], vid_frames[keep]
        source = starts[rows] + torch.minimum(frames, counts[rows] - 1)
        return embeds.index_put((rows, cols), embeds[rows, source], accumulate=True)
