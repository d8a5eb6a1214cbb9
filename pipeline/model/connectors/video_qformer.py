"""``video_qformer``, Video-LLaMA's vision-language branch after its frozen image branch: a learned frame position
embedding, a 2-layer video Q-Former with 32 queries over all frames' image-Q-Former tokens, and ``llama_proj``.

From DAMO-NLP-SG/Video-LLaMA (read at commit 64888c0) ``video_llama/models/video_llama.py`` (``VL``), by line:

- ``video_frame_position_embedding``: ``nn.Embedding(max_frame_pos, 768)`` (VL:186), max_frame_pos 32 (VL:72,
  567); PyTorch's default initialisation (normal(0, 1)): the model is a plain ``nn.Module``.
- ``video_Qformer``: LAVIS BERT of bert-base-uncased's geometry with 2 layers (VL:189-190 passes
  ``num_hidden_layers=2``; ``fusion_head_layers`` is read, VL:568, but not used), cross-attention in every layer
  (``cross_attention_freq = 1``, VL:38) over ``encoder_width`` = the image Q-Former's width 768 (VL:35, 189); its
  LM head, word and position embeddings and text feed-forward deleted (VL:192-197). Here a
  :class:`transformers.Blip2QFormerModel` (see :mod:`pipeline.model.qformer`).
- ``video_query_tokens``: ``(1, 32, 768)``, normal(0, 0.02) (VL:41-44; ``num_video_query_token`` 32, VL:74, 569).
- ``llama_proj``: ``nn.Linear(768, LLM hidden)`` (VL:153-155), PyTorch's default initialisation.
- ``encode_videoQformer_visual`` (VL:279-323): the image Q-Former's ``(B * T, 32, 768)`` outputs as
  ``(B, T, 32, 768)``, plus the position embedding of frame ``t`` (``arange(T)``) on each of its 32 tokens
  (VL:299-306), flattened to ``(B, T * 32, 768)`` frame by frame (VL:309), read by the video Q-Former's
  cross-attention with an all-ones mask (VL:310-319); its 32 outputs go through ``llama_proj`` (VL:321). An image is
  a one-frame video.

The rows this connector reads are the cached (or online) outputs of :mod:`pipeline.vision.qformer_tower`: a
visual's ``(T * 32, 768)`` rows in frame order, layout ``(T, 32)``; each visual gives ``num_query_tokens`` embeddings
whatever T. Visuals of the same frame count are run in one Q-Former call (Video-LLaMA batches videos of one T).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.connectors.base import Connector
from pipeline.model.qformer import (
    BERT_BASE_GEOMETRY,
    build_qformer,
    load_exactly,
    merge_settings,
    read_original,
    rename_lavis_qformer,
    strip_model_prefix,
)


class VideoQFormerConnector(Connector):
    """``video_qformer``: a visual's ``(T * S, D)`` image-Q-Former rows, layout ``(T, S)`` with S =
    ``image_query_tokens`` -> ``(num_query_tokens, hidden)``.

    Parameters (the original's names): ``video_frame_position_embedding.weight`` ``(max_frame_pos, D)``,
    ``video_query_tokens`` ``(1, num_query_tokens, hidden_size)``, ``video_Qformer.*`` (a Blip2QFormerModel:
    ``layernorm.*``, ``encoder.layer.N.{attention.attention, attention.output, crossattention.attention,
    crossattention.output, intermediate_query, output_query}.*``), ``llama_proj.{weight, bias}``.

    Args:
        in_dim: D, the image Q-Former's width (768).
        out_dim: the LLM's hidden size.
        settings: over :attr:`DEFAULTS`.

    Raises:
        ValueError: an unknown setting.
    """

    PARTS = ("frame_position", "video_qformer", "projector")
    DEFAULTS = {
        "num_query_tokens": 32,      # num_video_query_token (VL:74, 569)
        "num_hidden_layers": 2,      # VL:189-190
        "max_frame_pos": 32,         # VL:72, 567
        "image_query_tokens": 32,    # the image Q-Former's num_query_token (configs/models/video_llama.yaml:13)
        "cross_attention_freq": 1,   # VL:38
        **BERT_BASE_GEOMETRY,        # bert-base-uncased (VL:33)
    }

    def __init__(self, in_dim: int, out_dim: int, settings: dict | None = None):
        super().__init__()
        s = merge_settings("video_qformer", self.DEFAULTS, settings)
        self.settings = s
        self.num_query_tokens, self.max_frame_pos = s["num_query_tokens"], s["max_frame_pos"]
        self.image_query_tokens = s["image_query_tokens"]
        geometry = {k: s[k] for k in BERT_BASE_GEOMETRY}
        self.video_frame_position_embedding = nn.Embedding(self.max_frame_pos, in_dim)
        self.video_Qformer = build_qformer(text=False, encoder_width=in_dim, num_hidden_layers=s["num_hidden_layers"],
                                           cross_attention_freq=s["cross_attention_freq"], **geometry)
        self.video_query_tokens = nn.Parameter(torch.zeros(1, self.num_query_tokens, s["hidden_size"]))
        self.video_query_tokens.data.normal_(mean=0.0, std=s["initializer_range"])
        self.llama_proj = nn.Linear(s["hidden_size"], out_dim)

    def _check(self, frames: int, patches: int) -> None:
        if frames < 1:
            raise ValueError("video_qformer reads the image Q-Former's tokens per frame (features.pooling: frames), "
                             "not pooled rows")
        if patches != self.image_query_tokens:
            raise ValueError(f"video_qformer reads {self.image_query_tokens} image-Q-Former tokens a frame; the "
                             f"visual has {patches} (features of another tower than eva_vit_g_qformer?)")
        if frames > self.max_frame_pos:
            raise ValueError(f"video_qformer has frame positions for {self.max_frame_pos} frames (max_frame_pos); "
                             f"the visual has {frames}")

    def num_tokens(self, frames: int, patches: int, rows: int) -> int:
        """``num_query_tokens`` (32) for any frame count.

        Raises:
            ValueError: the layout is not per frame, S is not ``image_query_tokens`` or T > ``max_frame_pos``.
        """
        self._check(frames, patches)
        return self.num_query_tokens

    def project(self, rows: torch.Tensor, layouts: list[tuple[int, int]],
                queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``(sum T_i * 32, D)`` rows (float, the connector's dtype) -> ``(K * num_query_tokens, hidden)`` in the
        visuals' order (``queries`` ignored).

        Raises:
            ValueError: as :meth:`num_tokens`, or the rows are not the layouts' total.
        """
        for frames, patches in layouts:
            self._check(frames, patches)
        sizes = [frames * patches for frames, patches in layouts]
        if sum(sizes) != len(rows):
            raise ValueError(f"video_qformer: {len(rows)} rows for layouts {layouts} ({sum(sizes)} rows)")
        if not layouts:
            return self.llama_proj(rows.new_zeros((0, self.llama_proj.in_features)))
        visuals = rows.split(sizes)
        out: list[torch.Tensor | None] = [None] * len(layouts)
        for frames in sorted({t for t, _ in layouts}):
            members = [i for i, (t, _) in enumerate(layouts) if t == frames]
            x = torch.stack([visuals[i].reshape(frames, self.image_query_tokens, -1) for i in members])
            position = self.video_frame_position_embedding(torch.arange(frames, device=rows.device))  # (T, D)
            x = (x + position[None, :, None]).flatten(1, 2)  # (B, T * S, D), frame by frame (VL:299-309)
            query = self.video_query_tokens.expand(len(members), -1, -1)
            hidden = self.video_Qformer(query_embeds=query, encoder_hidden_states=x).last_hidden_state
            for i, h in zip(members, self.llama_proj(hidden.to(self.llama_proj.weight.dtype))):
                out[i] = h
        return torch.cat(out)

    def forward(self, rows: torch.Tensor, layout: tuple[int, int]) -> torch.Tensor:
        """One visual: ``(T * 32, D)`` -> ``(num_query_tokens, hidden)``."""
        return self.project(rows, [layout])

    def part(self, name: str) -> str:
        """``frame_position`` (``video_frame_position_embedding``), ``video_qformer`` (``video_Qformer``,
        ``video_query_tokens``: frozen or trained together by ``frozen_video_Qformer``, VL:201-215) or
        ``projector`` (``llama_proj``: ``frozen_llama_proj``, VL:161-169).

        Raises:
            ValueError: not a parameter of the connector.
        """
        top = name.split(".", 1)[0]
        if name in dict(self.named_parameters()):
            if top == "video_frame_position_embedding":
                return "frame_position"
            if top in ("video_Qformer", "video_query_tokens"):
                return "video_qformer"
            if top == "llama_proj":
                return "projector"
        raise ValueError(f"video_qformer has no parameter {name!r}")

    def load_original(self, path) -> None:
        """Load Video-LLaMA's vision-branch checkpoint (``ckpt``, e.g. ``VL_LLaMA_2_7B_Pretrained.pth`` or a
        finetuned one: ``torch.save({"model": state_dict, ...})``, VL:604-608), read weights-only.

        Loads exactly ``video_frame_position_embedding.weight``, ``video_query_tokens``, ``video_Qformer.bert.*``
        (renamed by :func:`~pipeline.model.qformer.rename_lavis_qformer`) and ``llama_proj.*``, under any common
        key prefix. Ignored on purpose: the frozen image branch (``visual_encoder.*``, ``ln_vision.*``,
        ``Qformer.*``, ``query_tokens``: :mod:`pipeline.vision.qformer_tower`'s, from EVA's and BLIP-2's files), the
        LLM (``llama_model.*``), the audio branch (``audio_*``, VL:225-268) and the ``position_ids`` buffer.

        Raises:
            ValueError: naming the file, when it lacks a tensor of the connector, has an unexpected one under
                ``video_Qformer`` (e.g. the text feed-forward Video-LLaMA deletes) or one of another shape.
        """
        state = strip_model_prefix(read_original(path), "video_query_tokens")
        if not state:
            raise ValueError(f"{path}: no video_query_tokens: not a Video-LLaMA vision-branch checkpoint")
        found = {f"video_Qformer.{k}": v for k, v in rename_lavis_qformer(state, "video_Qformer.").items()}
        for key in ("video_frame_position_embedding.weight", "video_query_tokens", "llama_proj.weight",
                    "llama_proj.bias"):
            if key in state:
                found[key] = state[key]
        load_exactly(self, found, path)

