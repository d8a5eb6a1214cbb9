"""``etchat_qformer``, E.T. Chat's connector: InstructBLIP's Q-Former conditioned on the visual's question, run on
each frame's EVA patch tokens, and an aggregator that compresses each frame to ONE LLM token.

From PolyU-ChenLab/ETBench (read at commit 445f620) ``etchat/model/etchat_arch.py`` (``A``), ``etchat/model/qformer.py``
(``Q``), ``etchat/model/language_model/phi3.py`` (``P``) and ``etchat/train/train.py`` (``T``), by line:

- ``qformer_bert``: LAVIS BERT of bert-base-uncased's geometry (12 layers), cross-attention every 2nd layer
  (``cross_attention_freq = 2``, A:45) over the vision width (A:43), word embeddings resized to the tokenizer's
  30523 (bert-base-uncased + ``[DEC]``, A:39-40,48); only its ``.bert`` runs (A:167; E.T. Chat's
  ``BertLMHeadModel`` has no LM head, Q:838-846). Here a :class:`transformers.InstructBlipQFormerModel` (see
  :mod:`pipeline.model.qformer`).
- ``qformer_query`` ``(1, 32, 768)`` normal(0, 0.02) (A:49-50); ``qformer_ln`` ``LayerNorm(D)`` (A:51);
  ``qformer_proj`` ``Linear(768, D)`` (A:53); ``qformer_q_proj``, ``qformer_k_proj`` ``LayerNorm(D), Linear(D, D)``
  and ``qformer_v_proj`` ``LayerNorm(D), Linear(D, hidden)`` (A:54-56), D the vision width (1408).
- Initialisation of the layers the released Q-Former file does not hold (``qformer_proj``, ``qformer_*_proj``): the
  model is a transformers ``PreTrainedModel`` (P:20-25 ``post_init``) whose ``_init_weights`` (transformers 4.44.2,
  ``requirements.txt``; Phi-3's) draws every ``nn.Linear`` weight from normal(0, ``initializer_range`` = 0.02) with a
  zero bias and leaves LayerNorms at one and zero; so here.
- ``compress_image_qformer`` (A:135-190), per visual: the question tokenized (A:146-148) and repeated for each of
  the visual's T frames (A:152-158); the Q-Former reads ``[32 queries; question]`` with the question's padding
  masked (A:163-164, 167-172), its cross-attention the frame's ``qformer_ln``-normalised patches (A:165); the 32
  query outputs go through ``qformer_proj`` to D (A:174); then the aggregator: ``softmax(q_proj(Q) k_proj(X)^T /
  sqrt(D)) X`` with X the frame's un-normalised patches (A:176-181), ``(that + Q).mean`` over the 32 queries
  (A:182) and ``qformer_v_proj`` to the LLM width (A:183): one token a frame, in frame order (A:185-186).
  ``use_time_tag`` (a question per frame, A:142-144) is off in E.T. Chat's training (T:42) and not supported.
- Its input is the EVA tower's patch tokens without CLS (``vision_output_token`` ``patch``, A:38, 112-113): rows
  ``(T * S, D)``, layout ``(T, S)``, S = 256 at 224 px.

All frames of the batch's visuals go through ONE Q-Former call (E.T. Chat: one call per visual): the questions come
padded to the batch's longest and the padding is masked, which changes nothing beyond rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.model.connectors.base import Connector
from pipeline.model.qformer import (
    BERT_BASE_GEOMETRY,
    BERT_BASE_LAYERS,
    INSTRUCTBLIP_VOCAB,
    build_qformer,
    load_exactly,
    merge_settings,
    read_original,
    rename_lavis_qformer,
    strip_model_prefix,
)

# The Linear layers E.T. Chat's PreTrainedModel initialises (see the module docstring): normal(0, 0.02), zero bias.
LINEAR_INIT_STD = 0.02


class ETChatQFormerConnector(Connector):
    """``etchat_qformer``: a visual's ``(T * S, D)`` patch rows and its question -> ``(T, hidden)``.

    Parameters (the original's names): ``qformer_bert.*`` (an InstructBlipQFormerModel: ``embeddings.{word_embeddings,
    position_embeddings, layernorm}``, ``encoder.layer.N.{attention.attention, attention.output, crossattention.*,
    intermediate, output, intermediate_query, output_query}.*``), ``qformer_query``, ``qformer_ln``,
    ``qformer_proj``, ``qformer_q_proj.{0,1}``, ``qformer_k_proj.{0,1}``, ``qformer_v_proj.{0,1}``.

    Args:
        in_dim: D, the vision width (EVA-ViT-G: 1408).
        out_dim: the LLM's hidden size.
        settings: over :attr:`DEFAULTS`.

    Raises:
        ValueError: an unknown setting.
    """

    needs_query = True
    PARTS = ("qformer_attention", "qformer_ffn", "queries", "aggregator", "projector")
    DEFAULTS = {
        "num_query_tokens": 32,                 # A:49
        "num_hidden_layers": BERT_BASE_LAYERS,  # bert-base-uncased's 12 (A:42)
        "cross_attention_freq": 2,              # A:45
        "vocab_size": INSTRUCTBLIP_VOCAB,       # 30522 + [DEC] (A:39-40,48)
        **BERT_BASE_GEOMETRY,                   # bert-base-uncased (A:42)
    }

    def __init__(self, in_dim: int, out_dim: int, settings: dict | None = None):
        super().__init__()
        s = merge_settings("etchat_qformer", self.DEFAULTS, settings)
        self.settings = s
        self.num_query_tokens = s["num_query_tokens"]
        geometry = {k: s[k] for k in BERT_BASE_GEOMETRY}
        self.qformer_bert = build_qformer(text=True, encoder_width=in_dim, num_hidden_layers=s["num_hidden_layers"],
                                          cross_attention_freq=s["cross_attention_freq"], vocab_size=s["vocab_size"],
                                          **geometry)
        self.qformer_query = nn.Parameter(torch.zeros(1, self.num_query_tokens, s["hidden_size"]))
        self.qformer_query.data.normal_(std=s["initializer_range"])
        self.qformer_ln = nn.LayerNorm(in_dim)
        self.qformer_proj = nn.Linear(s["hidden_size"], in_dim)
        self.qformer_q_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim))
        self.qformer_k_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim))
        self.qformer_v_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
        for linear in (self.qformer_proj, self.qformer_q_proj[1], self.qformer_k_proj[1], self.qformer_v_proj[1]):
            nn.init.normal_(linear.weight, std=LINEAR_INIT_STD)
            nn.init.zeros_(linear.bias)

    def num_tokens(self, frames: int, patches: int, rows: int) -> int:
        """T: one token a frame (an image: one).

        Raises:
            ValueError: the layout is not per frame.
        """
        if frames < 1:
            raise ValueError("etchat_qformer reads per-frame patch tokens (features.pooling: frames, spatial_pool: 1), "
                             "not pooled rows")
        return frames

    def project(self, rows: torch.Tensor, layouts: list[tuple[int, int]],
                queries: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``(sum T_i * S_i, D)`` rows (the connector's dtype) and each visual's question -> ``(sum T_i, hidden)``,
        visual by visual, frame by frame.

        Args:
            queries: ``(input_ids, attention_mask)``, both ``(K, Lq)`` int64, right-padded, in the tokenizer of
                :func:`pipeline.model.qformer.qformer_tokenizer`.

        Raises:
            ValueError: no ``queries`` (with visuals), or not one a visual; a layout that is not per frame; rows
                that are not the layouts' total.
        """
        if not layouts:  # a text-only batch: no frames, no question needed; the output stays in the graph
            return self.qformer_v_proj(rows.new_zeros((0, rows.shape[-1])))
        if queries is None:
            raise ValueError("etchat_qformer reads each visual's question (query_input_ids, query_attention_mask): "
                             "none given")
        input_ids, attention_mask = queries
        if len(input_ids) != len(layouts) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"etchat_qformer: {len(layouts)} visuals but questions of shape {tuple(input_ids.shape)} "
                             f"with a mask of shape {tuple(attention_mask.shape)}")
        for frames, patches in layouts:
            self.num_tokens(frames, patches, frames * patches)
        sizes = [frames * patches for frames, patches in layouts]
        if sum(sizes) != len(rows):
            raise ValueError(f"etchat_qformer: {len(rows)} rows for layouts {layouts} ({sum(sizes)} rows)")
        visuals = rows.split(sizes)
        input_ids, attention_mask = input_ids.to(rows.device), attention_mask.to(rows.device)
        out: list[torch.Tensor | None] = [None] * len(layouts)
        for patches in sorted({s for _, s in layouts}):
            members = [i for i, (_, s) in enumerate(layouts) if s == patches]
            frames = torch.tensor([layouts[i][0] for i in members], device=rows.device)
            images = torch.cat([visuals[i].reshape(-1, patches, rows.shape[-1]) for i in members])  # (F, S, D)
            tokens = self._frames(images, input_ids[members].repeat_interleave(frames, 0),
                                  attention_mask[members].repeat_interleave(frames, 0))
            for i, part in zip(members, tokens.split(frames.tolist())):
                out[i] = part
        return torch.cat(out)

    def _frames(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(F, S, D)`` frames, each with its ``(F, Lq)`` question -> ``(F, hidden)`` (A:161-183)."""
        query = self.qformer_query.expand(len(images), -1, -1)
        mask = torch.cat((attention_mask.new_ones(query.shape[:-1]), attention_mask), dim=1)
        hidden = self.qformer_bert(input_ids=input_ids, attention_mask=mask, query_embeds=query,
                                   encoder_hidden_states=self.qformer_ln(images)).last_hidden_state
        query_embeds = self.qformer_proj(hidden[:, :self.num_query_tokens].to(images.dtype))  # (F, 32, D)
        q, k = self.qformer_q_proj(query_embeds), self.qformer_k_proj(images)
        attention = (q @ k.transpose(-1, -2) / images.shape[-1] ** 0.5).softmax(-1)  # (F, 32, S)
        pooled = (attention @ images + query_embeds).mean(1)  # (F, D)
        return self.qformer_v_proj(pooled)

    def forward(self, rows: torch.Tensor, layout: tuple[int, int], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        """One visual: ``(T * S, D)`` and its ``(Lq,)`` question -> ``(T, hidden)``."""
        return self.project(rows, [layout], (input_ids[None], attention_mask[None]))

    def part(self, name: str) -> str:
        """``qformer_attention`` (``qformer_bert`` parameters with ``attention`` in the name: self- and
        cross-attention with their output dense and LayerNorm), ``qformer_ffn`` (the rest of ``qformer_bert``: the
        embeddings and the feed-forwards), ``queries`` (``qformer_query``, ``qformer_ln``), ``aggregator``
        (``qformer_proj``, ``qformer_q_proj``, ``qformer_k_proj``) or ``projector`` (``qformer_v_proj``).

        E.T. Chat's tuning modes (T:471-479) select, by its names: ``projector`` ("qformer" and "proj" in the name)
        = aggregator + projector; ``attention`` ("qformer" and ("attention" or not "qformer_bert")) =
        qformer_attention + queries + aggregator + projector; ``qformer`` = every part.

        Raises:
            ValueError: not a parameter of the connector.
        """
        if name not in dict(self.named_parameters()):
            raise ValueError(f"etchat_qformer has no parameter {name!r}")
        top = name.split(".", 1)[0]
        if top == "qformer_bert":
            return "qformer_attention" if "attention" in name else "qformer_ffn"
        if top in ("qformer_query", "qformer_ln"):
            return "queries"
        if top in ("qformer_proj", "qformer_q_proj", "qformer_k_proj"):
            return "aggregator"
        return "projector"

    def load_original(self, path) -> None:
        """Load a released checkpoint, read weights-only, into the connector.

        - LAVIS's InstructBLIP file (``instruct_blip_vicuna7b_trimmed.pth``, ``--pretrain_qformer``; its ``model``):
          exactly ``Qformer.bert.*`` into ``qformer_bert`` (renamed by
          :func:`~pipeline.model.qformer.rename_lavis_qformer`), ``ln_vision.*`` into ``qformer_ln`` and
          ``query_tokens`` into ``qformer_query`` (A:70-75); the aggregator and projector keep their
          initialisation. Ignored on purpose: InstructBLIP's projection and LLM (``llm_proj.*``, ``llm_model.*``),
          a vision encoder (``visual_encoder.*``: the EVA tower loads its own file), anything else outside
          ``Qformer.``, and the ``position_ids`` buffer.
        - An E.T. Chat model's state (keys ``[prefix]qformer_bert.bert.*``, ``[prefix]qformer_query``, ...): the
          whole connector, exactly.

        Raises:
            ValueError: naming the file, when a tensor is missing, unexpected (e.g. ``Qformer.cls.*``, which E.T.
                Chat's strict load would reject too) or of another shape.
        """
        state = read_original(path)
        if any(key.startswith("Qformer.") for key in state):
            found = {f"qformer_bert.{k}": v for k, v in rename_lavis_qformer(state, "Qformer.", text=True).items()}
            found.update({f"qformer_ln.{k[len('ln_vision.'):]}": v for k, v in state.items()
                          if k.startswith("ln_vision.")})
            if "query_tokens" in state:
                found["qformer_query"] = state["query_tokens"]
            load_exactly(self, found, path, parts=("qformer_bert", "qformer_ln", "qformer_query"))
            return
        state = strip_model_prefix(state, "qformer_query")
        if not state:
            raise ValueError(f"{path}: neither Qformer.* (LAVIS) nor qformer_query (E.T. Chat) keys")
        found = {f"qformer_bert.{k}": v for k, v in rename_lavis_qformer(state, "qformer_bert.", text=True).items()}
        found.update({k: v for k, v in state.items() if k.split(".", 1)[0] in (
            "qformer_query", "qformer_ln", "qformer_proj", "qformer_q_proj", "qformer_k_proj", "qformer_v_proj")})
        load_exactly(self, found, path)
