"""``eva_vit_g_qformer``: Video-LLaMA's frozen image branch as one vision tower: EVA-ViT-G (CLS token included),
BLIP-2's ``ln_vision`` and BLIP-2's image Q-Former, 32 tokens of width 768 a frame.

From DAMO-NLP-SG/Video-LLaMA (read at commit 64888c0) ``video_llama/models/blip2.py`` (``B``) and
``video_llama/models/video_llama.py`` (``VL``), by line:

- ``ln_vision``: ``LayerNorm(1408)`` (PyTorch's eps 1e-5) computing in float32 and casting back (B:70, 100-106), over
  all 257 EVA tokens, CLS first (VL:287).
- The image Q-Former: ``init_Qformer(num_query_token, 1408)`` (VL:101-103): bert-base-uncased's geometry, 12 layers,
  cross-attention every 2nd layer (``cross_attention_freq`` 2, B:47-53) over EVA's width; ``query_tokens``
  ``(1, 32, 768)`` normal(0, 0.02) (B:55-58; ``num_query_token`` 32, configs/models/video_llama.yaml:13); its LM
  head, word and position embeddings and text feed-forward deleted (VL:104-109). Here a
  :class:`transformers.Blip2QFormerModel` (see :mod:`pipeline.model.qformer`).
- Forward (VL:284-302): the frames' EVA tokens through ``ln_vision``, the Q-Former's cross-attention over them (all
  ones mask), ``last_hidden_state``: ``(T, 32, 768)``.
- Weights: ``q_former_model``, BLIP-2's ``blip2_pretrained_flant5xxl.pth`` (VL:50, 542), its ``model`` loaded
  non-strictly (B:73-91): here exactly ``Qformer.*``, ``query_tokens`` and ``ln_vision.*``.
- Frozen (``freeze_qformer``, ``freeze_vit``: VL:88-118, ``train`` disabled so that it stays in eval mode): a tower
  without a trainable parameter stays in eval mode here too (no Q-Former dropout in a training step).

Differences, none beyond rounding: upstream runs the branch under float16 autocast (VL:286, B:36-44); here it
computes in the tower's dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeline.model.qformer import (
    BERT_BASE_GEOMETRY,
    BERT_BASE_LAYERS,
    build_qformer,
    lavis_text_only,
    load_exactly,
    merge_settings,
    read_original,
    rename_lavis_qformer,
)
from pipeline.vision.tower import VisionTower

log = logging.getLogger(__name__)

DEFAULTS = {
    "pretrained": None,                     # q_former_model (VL:50, 542); None: random weights
    "num_query_token": 32,                  # configs/models/video_llama.yaml:13
    "cross_attention_freq": 2,              # B:47
    "num_hidden_layers": BERT_BASE_LAYERS,  # bert-base-uncased (B:48)
    **BERT_BASE_GEOMETRY,                   # bert-base-uncased (B:48)
}


class QFormerTower(VisionTower):
    """Video-LLaMA's image branch: ``(T, 3, H, W)`` frames -> ``(T, 32, 768)`` query tokens.

    Parameters: ``visual_encoder.*`` (the EVA tower's own names), ``ln_vision.{weight, bias}``, ``Qformer.*`` (a
    Blip2QFormerModel: ``layernorm.*``, ``encoder.layer.N.*``; LAVIS's ``Qformer.bert.*`` through
    :func:`~pipeline.model.qformer.rename_lavis_qformer`), ``query_tokens``.

    Attributes:
        dim: the Q-Former's width (768); grid: ``(1, num_query_token)``; image_size, mean, std: the base tower's;
        clip_frames: 1; heads: the Q-Former's attention heads.

    Args:
        base: an EVA tower (:class:`pipeline.vision.eva.EVAVisionTower`): ``hidden(pixels) -> (T, 1 + S, D)``,
            ``dim``, ``image_size``, ``mean``, ``std``.
        settings: :data:`DEFAULTS` keys except ``pretrained``.
    """

    def __init__(self, base: nn.Module, settings: dict):
        super().__init__()
        geometry = {k: settings[k] for k in BERT_BASE_GEOMETRY}
        self.visual_encoder = base
        self.ln_vision = nn.LayerNorm(base.dim)
        self.Qformer = build_qformer(text=False, encoder_width=base.dim,
                                     num_hidden_layers=settings["num_hidden_layers"],
                                     cross_attention_freq=settings["cross_attention_freq"], **geometry)
        self.query_tokens = nn.Parameter(torch.zeros(1, settings["num_query_token"], settings["hidden_size"]))
        self.query_tokens.data.normal_(mean=0.0, std=settings["initializer_range"])
        self.dim = settings["hidden_size"]
        self.grid = (1, settings["num_query_token"])
        self.clip_frames = 1
        self.image_size, self.mean, self.std = tuple(base.image_size), tuple(base.mean), tuple(base.std)
        self.heads = settings["num_attention_heads"]

    @property
    def gradient_checkpointing(self) -> bool:
        """The base tower's (EVA's blocks recomputed in backward)."""
        return bool(getattr(self.visual_encoder, "gradient_checkpointing", False))

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.visual_encoder.gradient_checkpointing = value

    def train(self, mode: bool = True):
        """Train mode only while a parameter trains: frozen, it stays in eval mode as Video-LLaMA's (VL:88-118)."""
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` normalised frames -> ``(T, num_query_token, dim)`` in the dtype of ``pixels``
        (Video-LLaMA at 224 px: ``(T, 32, 768)``).

        Raises:
            ValueError: the base tower's, for frames of another shape.
        """
        tokens = self.visual_encoder.hidden(pixels)  # (T, 1 + S, D), CLS first
        ln = self.ln_vision  # in float32, cast back (B:100-106)
        tokens = nn.functional.layer_norm(tokens.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(),
                                          ln.eps).to(tokens.dtype)
        query = self.query_tokens.expand(len(tokens), -1, -1)
        out = self.Qformer(query_embeds=query, encoder_hidden_states=tokens).last_hidden_state
        return out.to(pixels.dtype)

    def load_original(self, path) -> None:
        """Load a BLIP-2 checkpoint's Q-Former (``blip2_pretrained_flant5xxl.pth`` or any with ``Qformer.*``,
        ``query_tokens``, ``ln_vision.*``), read weights-only, exactly.

        Ignored on purpose: everything outside those three (``visual_encoder.*``: the EVA tower loads
        ``eva_vit_g.pth``; the language side: ``t5_proj.*``, ``t5_model.*``, ``opt_proj.*``, ``llm_proj.*``, ...), the
        ``position_ids`` buffer and the Q-Former's text-only parts Video-LLaMA deletes (``Qformer.cls.*``, the word
        and position embeddings, each layer's ``intermediate``/``output``; VL:104-109).

        Raises:
            ValueError: naming the file, when a tensor is missing, unexpected or of another shape.
        """
        state = read_original(path)
        found = {f"Qformer.{k}": v for k, v in rename_lavis_qformer(state, "Qformer.").items()
                 if not lavis_text_only(k)}
        found.update({k: v for k, v in state.items() if k.startswith("ln_vision.") or k == "query_tokens"})
        load_exactly(self, found, path, parts=("Qformer", "ln_vision", "query_tokens"))


def build_qformer_tower(base: nn.Module, overrides: dict, seed: int) -> QFormerTower:
    """Video-LLaMA's image branch over ``base`` (an EVA tower), in float32, every parameter trainable.

    Args:
        base: see :class:`QFormerTower`.
        overrides: :data:`DEFAULTS` keys (``pretrained``: a BLIP-2 checkpoint; tiny test geometries:
            ``{"num_query_token": 4, "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
            "intermediate_size": 64}``).
        seed: ``torch.manual_seed`` of the random weights, drawn from a forked random state.

    Raises:
        ValueError: an unknown override, or a checkpoint that does not fit.
    """
    settings = merge_settings("eva_vit_g_qformer qformer", DEFAULTS, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = QFormerTower(base, {k: v for k, v in settings.items() if k != "pretrained"})
    if settings["pretrained"] is None:
        log.warning("eva_vit_g_qformer: image Q-Former with RANDOM weights (seed %d)", seed)
    else:
        tower.load_original(settings["pretrained"])
    return tower
