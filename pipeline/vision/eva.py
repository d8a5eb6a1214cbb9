"""EVA-ViT-G: the frozen image encoder of BLIP-2, Video-LLaMA and E.T. Chat, built from timm's ``Eva`` blocks.

All three load the same released file, LAVIS's ``eva_vit_g.pth`` (EVA-CLIP's ViT-g/14 vision tower, 40 blocks; a
flat state dict). The facts below cite Video-LLaMA (DAMO-NLP-SG/Video-LLaMA, read at commit 64888c0) ``eva_vit.py``,
``blip2.py``, ``video_llama.py`` and ``processors/`` (all under ``video_llama/``) and E.T. Chat
(PolyU-ChenLab/ETBench, read at commit 445f620) ``etchat/model/vision_encoder/eva_vit.py`` (``etchat eva_vit.py``)
and ``etchat/utils/transforms.py``, by line:

- Shape: 224 px, 14 px patches (a 16 x 16 grid, 256 patches), width 1408, 16 heads (``1408 // 88``), MLP ratio
  4.3637 (hidden ``int(1408 * 4.3637)`` = 6144), LayerNorm eps 1e-6, no layer scale (``init_values`` None),
  ``qkv_bias`` True (eva_vit.py:415-428; etchat eva_vit.py:415-431).
- Tokens: ``Conv2d`` patches, a learned CLS token first, then a learned absolute position embedding over the
  257 tokens (eva_vit.py:259-265, 324-332); no relative position bias (eva_vit.py:252, 270-273).
- Blocks: pre-norm ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (eva_vit.py:173-180); attention: ``qkv`` a
  bias-free ``Linear(D, 3D)`` plus ``q_bias`` and ``v_bias`` parameters, the key bias zero, scale
  ``head_dim ** -0.5`` (eva_vit.py:64-148); MLP ``fc1``, exact ``nn.GELU``, ``fc2`` (eva_vit.py:44-61, 153-165).
- No final norm: the output is the last built block's, CLS included (eva_vit.py:284, 335-341); BLIP-2 passes all
  257 tokens through its own ``ln_vision`` (a LayerNorm of width 1408, eps 1e-5) into the Q-Former
  (blip2.py:61-71; video_llama.py:285-296). E.T. Chat drops the CLS token (``vision_output_token`` ``patch``,
  etchat/model/etchat_arch.py:112-113) before its Q-Former.
- Depth: the released file has 40 blocks; BLIP-2 builds 39 (``depth=39``, eva_vit.py:421) and loads the file with
  ``strict=False`` (eva_vit.py:436), so the 40th is dropped: "we remove the last layer of the ViT and use the second
  last layer's output features" (BLIP-2 paper, arXiv 2301.12597, "Pre-trained image encoder and LLM"; quoted in
  salesforce/LAVIS issue 216). E.T. Chat builds ``40 + vision_output_layer + 1`` blocks (etchat eva_vit.py:425)
  with ``vision_output_layer`` -2 (etchat/train/train.py:35; scripts/train_stage_1.sh:18): the same 39.
- ``layer`` here is E.T. Chat's ``vision_output_layer`` and the other towers' ``layer``: counted from the end of the
  released 40 blocks, ``depth + layer + 1`` blocks built. So ``-2`` is BLIP-2's, Video-LLaMA's and E.T. Chat's
  block (39 built), ``-1`` all 40.
- Another resolution: the checkpoint's position embedding is resized on load, CLS entry kept, the grid part
  bicubic with ``align_corners=False`` and no antialiasing, in float32 (``interpolate_pos_embed``,
  eva_vit.py:373-394; etchat eva_vit.py:390-407). Video-LLaMA and E.T. Chat run at 224 px
  (``configs/models/video_llama.yaml:5``, ``video_llama.yaml`` below; etchat eva_vit.py:415).
- Pixels: CLIP's mean/std (blip_processors.py:20-23; video_processor.py:61-64; etchat transforms.py:6-7).
  Video-LLaMA resizes video frames to 224 x 224 while decoding (the whole frame, aspect ratio not kept;
  video_processor.py:209-220 via ``load_video``'s ``height``/``width``, :25-27) and images bicubic to 224 x 224
  (blip_processors.py:113-126); E.T. Chat's ``clip_center_224`` resizes the short side to 224 (antialiased), centre
  crops and bilinearly resizes to 224 (etchat transforms.py:26-37, 64-73).
- Random weights (``pretrained`` None): upstream's initialisation, which timm's ``Eva`` reproduces: truncated
  normal (std 0.02) Linear weights, CLS token and position embedding, zero Linear biases and ``q_bias``/``v_bias``,
  unit LayerNorms, ``attn.proj`` and ``mlp.fc2`` weights of block ``i`` divided by ``sqrt(2 (i + 1))``, the patch
  ``Conv2d`` at PyTorch's default (eva_vit.py:288-315).

Why timm: timm's ``timm.models.eva.Eva`` (timm 1.0.31 installed; open_clip_torch 3.3.0 requires timm>=1.0.17)
with ``qkv_fused=True``, no rope, ``num_classes=0`` and no final/fc norm has exactly the released parameter names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.N.{norm1, attn.qkv, attn.q_bias, attn.v_bias,
attn.proj, norm2, mlp.fc1, mlp.fc2}``: no key rename), a non-persistent zero ``k_bias`` buffer, ``nn.GELU``
(exact), LayerNorm eps 1e-6 (we pass it explicitly), scale ``head_dim ** -0.5`` (``scaled_dot_product_attention``'s
default) and upstream's initialisation. The tower keeps only its ``patch_embed``, ``cls_token``, ``pos_embed`` and
the built ``blocks`` as its own attributes, so ``state_dict()`` keys are the file's, and runs them itself.

Differences from upstream, none of which changes the numbers beyond rounding: attention is
``scaled_dot_product_attention`` (upstream: explicit softmax); the qkv bias is added after calling the ``qkv``
module (timm's ``qkv_bias_separate``, set on every block; upstream passes ``qkv.weight`` to ``F.linear``,
eva_vit.py:124, which would bypass a LoRA adapter on ``qkv``); upstream converts the Linear and Conv weights to fp16
and runs under fp16 autocast with LayerNorms, CLS, position embedding and q/v biases in fp32 (eva_vit.py:397-412,
439-441; blip2.py:36-44), while this tower computes in one dtype, the one the caller casts it to; activation
checkpointing is off unless asked for (``use_grad_checkpoint`` False, video_llama.yaml:7, the same); and the loader
is strict (upstream: ``strict=False``), dropping only what upstream drops by design.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.vision.tower import VisionTower

log = logging.getLogger(__name__)

# CLIP's pixel statistics, which BLIP-2's processors use (blip_processors.py:20-23; video_processor.py:61-64;
# etchat transforms.py:6-7).
BLIP2_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP2_STD = (0.26862954, 0.26130258, 0.27577711)

# Top-level modules of EVA-CLIP's vision tower that BLIP-2's VisionTransformer does not have (final ``norm``,
# ``fc_norm``, classifier ``head``: commented out, eva_vit.py:284-286) and whose weights upstream's
# ``strict=False`` load would ignore if a file carried them.
IGNORED_PREFIXES = ("norm.", "fc_norm.", "head.")


@dataclass
class EVAConfig:
    """The shape of an EVA ViT; the defaults are EVA-ViT-G as BLIP-2 builds it (eva_vit.py:415-428).

    Attributes:
        image_size: pixels of the square input frames (224, video_llama.yaml:5).
        patch_size: pixels of a square patch (14).
        width: D, the token width (1408).
        depth: blocks of the released checkpoint (40: EVA-CLIP-g's; etchat eva_vit.py:425), of which
            ``depth + layer + 1`` are built.
        heads: attention heads (``1408 // 88`` = 16).
        mlp_ratio: MLP hidden width / D (4.3637: hidden ``int(D * mlp_ratio)`` = 6144).
        layer: the block whose output is returned, counted from the end of the ``depth`` blocks as E.T. Chat's
            ``vision_output_layer`` (``-1``: the last; ``-2``: the penultimate, BLIP-2's 39th, the default); the
            blocks after it are not built.
        qkv_bias: learned query and value biases (``q_bias``, ``v_bias``; the key bias is zero).
        norm_eps: eps of the blocks' LayerNorms (1e-6, eva_vit.py:426).
        drop_path_rate: stochastic depth, linear from 0 over the built blocks (0: video_llama.yaml:6; BLIP-2's
            function default 0.4, eva_vit.py:415, is overridden by every config).
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1408
    depth: int = 40
    heads: int = 16
    mlp_ratio: float = 4.3637
    layer: int = -2
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"eva: width {self.width} is not a multiple of heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"eva: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not -self.depth <= self.layer <= -1:
            raise ValueError(f"eva: layer counts from the end (-1 last, -2 penultimate), within -{self.depth}..-1 "
                             f"for depth {self.depth}; got {self.layer}")

    @property
    def kept_blocks(self) -> int:
        """Blocks that are built and run: ``depth + layer + 1`` (etchat eva_vit.py:425; 39 for BLIP-2)."""
        return self.depth + self.layer + 1

    @property
    def grid(self) -> int:
        """Patches per side of a frame (16 at 224 px)."""
        return self.image_size // self.patch_size


def _timm_eva(config: EVAConfig) -> nn.Module:
    """timm's ``Eva`` laid out as BLIP-2's ``VisionTransformer`` with ``config.kept_blocks`` blocks.

    Raises:
        RuntimeError: the installed timm's ``EvaAttention`` cannot call its ``qkv`` module (no ``qkv_bias_separate``).
    """
    import timm
    from timm.models.eva import Eva

    eva = Eva(img_size=config.image_size, patch_size=config.patch_size, num_classes=0, global_pool="token",
              embed_dim=config.width, depth=config.kept_blocks, num_heads=config.heads, qkv_bias=config.qkv_bias,
              qkv_fused=True, mlp_ratio=config.mlp_ratio, norm_layer=partial(nn.LayerNorm, eps=config.norm_eps),
              init_values=None, class_token=True, use_abs_pos_emb=True, use_rot_pos_emb=False,
              use_post_transformer_norm=False, use_fc_norm=False, drop_path_rate=config.drop_path_rate)
    for block in eva.blocks:
        if not hasattr(block.attn, "qkv_bias_separate"):
            raise RuntimeError(f"eva: timm {timm.__version__}'s EvaAttention has no qkv_bias_separate: its forward "
                               "would bypass a LoRA adapter on attn.qkv (timm 1.0.31 has it)")
        block.attn.qkv_bias_separate = True  # qkv(x) + bias: the module is called, so a LoRA adapter on it runs
    return eva


class EVAVisionTower(VisionTower):
    """EVA-ViT-G as a :class:`~pipeline.vision.tower.VisionTower`: ``(T, 3, H, W)`` frames -> ``(T, S, D)``.

    Each frame is one image (``clip_frames`` 1). :meth:`hidden` returns block ``config.layer``'s output with the CLS
    token first and no final norm (what BLIP-2's ``ln_vision`` and Q-Former read); :meth:`forward` the same without
    the CLS token (E.T. Chat's ``patch`` tokens and the interface's patch tokens).

    ``state_dict()`` keys are the released ``eva_vit_g.pth``'s: ``cls_token``, ``pos_embed``,
    ``patch_embed.proj.{weight,bias}``, ``blocks.{i}.{norm1, attn.q_bias, attn.v_bias, attn.qkv.weight, attn.proj,
    norm2, mlp.fc1, mlp.fc2}.*`` for the built blocks (see :data:`ORIGINAL_BLOCK_KEYS`). Set
    ``gradient_checkpointing = True`` to recompute the blocks in backward while training.

    Attributes:
        config: the :class:`EVAConfig`.
        patch_embed: timm ``PatchEmbed``, ``(B, 3, H, W) -> (B, S, D)``.
        cls_token: ``(1, 1, D)`` parameter.
        pos_embed: ``(1, 1 + S, D)`` parameter, CLS position first.
        blocks: the ``config.kept_blocks`` timm ``EvaBlock`` s.
        gradient_checkpointing: recompute each block in backward (training with gradients only).
    """

    def __init__(self, config: EVAConfig):
        super().__init__()
        self.config = config
        self.dim = config.width
        self.grid = (config.grid, config.grid)
        self.clip_frames = 1
        self.image_size = (config.image_size, config.image_size)
        self.mean, self.std = BLIP2_MEAN, BLIP2_STD
        self.heads = config.heads
        eva = _timm_eva(config)
        self.patch_embed = eva.patch_embed
        self.cls_token = eva.cls_token
        self.pos_embed = eva.pos_embed
        self.blocks = eva.blocks
        self.gradient_checkpointing = False

    def hidden(self, pixels: torch.Tensor) -> torch.Tensor:
        """All tokens of block ``config.layer``, CLS first, no final norm (eva_vit.py:324-340).

        Args:
            pixels: ``(T, 3, H, W)`` normalised frames, ``(H, W)`` = :attr:`image_size`, any float dtype (computed
                in the tower's).

        Returns:
            ``(T, 1 + S, D)`` tokens in the dtype of ``pixels`` (EVA-ViT-G at 224 px: ``(T, 257, 1408)``).

        Raises:
            ValueError: ``pixels`` is not ``(T, 3, H, W)`` at the tower's size.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != self.image_size:
            raise ValueError(f"eva: expected (T, 3, {self.image_size[0]}, {self.image_size[1]}) frames, got "
                             f"{tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))  # (T, S, D)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if checkpointing else block(x)
        return x.to(pixels.dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``config.layer``: :meth:`hidden` without the CLS token.

        Args:
            pixels: as :meth:`hidden`.

        Returns:
            ``(T, S, D)`` tokens in the dtype of ``pixels`` (EVA-ViT-G at 224 px: ``(T, 256, 1408)``).

        Raises:
            ValueError: as :meth:`hidden`.
        """
        return self.hidden(pixels)[:, 1:]


# The names of one block's tensors in eva_vit_g.pth (eva_vit.py:151-171 Block, 64-116 Attention, 44-52 Mlp).
ORIGINAL_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
                       "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight",
                       "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
# ... and outside the blocks (eva_vit.py:259-265, 196).
ORIGINAL_STEM_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")

_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """A checkpoint's position embedding at another grid, as upstream's ``interpolate_pos_embed``
    (eva_vit.py:373-394).

    Args:
        pos_embed: ``(1, 1 + g * g, D)``, the CLS position first, any float dtype.
        grid: the new grid side.

    Returns:
        ``(1, 1 + grid * grid, D)`` float32: the CLS entry unchanged, the ``g x g`` grid resized bicubic
        (``align_corners=False``, no antialiasing) in float32; the input as float32 when ``g == grid``.

    Raises:
        ValueError: ``pos_embed`` is not ``(1, 1 + g * g, D)``.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"eva: pos_embed must be (1, 1 + g * g, D), got {tuple(pos_embed.shape)}")
    side = math.isqrt(pos_embed.shape[1] - 1)
    if side * side != pos_embed.shape[1] - 1:
        raise ValueError(f"eva: pos_embed has {pos_embed.shape[1] - 1} grid positions, not a square")
    pos_embed = pos_embed.float()
    if side == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    tokens = pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((pos_embed[:, :1], tokens.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def load_eva_weights(tower: EVAVisionTower, path: str) -> None:
    """Load the released ``eva_vit_g.pth`` (or a file of the same layout) into ``tower``, in place.

    The file is read with ``torch.load(path, map_location="cpu", weights_only=True)`` (tensors only, no pickled
    code): a flat state dict under the original names, or a dict whose ``model`` entry is one. Dropped, as upstream's
    ``strict=False`` load drops them (eva_vit.py:436): the blocks after ``tower.config.layer`` (index
    ``kept_blocks`` up to ``depth - 1``; the 40th for BLIP-2) and EVA-CLIP's ``norm``/``fc_norm``/``head`` weights
    (:data:`IGNORED_PREFIXES`) should the file hold them. A position embedding of another grid is resized to the
    tower's (:func:`resize_pos_embed`). Every other key must match the tower's, name and shape; the values are cast
    to the tower's dtype (the released file is half precision).

    Raises:
        ValueError: naming ``path``: not a state dict, or missing, unexpected or mis-shaped keys.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not an EVA checkpoint (expected a flat dict of tensors, as eva_vit_g.pth, or a "
                         "dict with one under 'model')")
    config = tower.config
    pruned = {k for k in state if (m := _BLOCK_KEY.match(k)) and config.kept_blocks <= int(m.group(1)) < config.depth}
    ignored = {k for k in state if k.startswith(IGNORED_PREFIXES)}
    state = {k: v for k, v in state.items() if k not in pruned and k not in ignored}
    expected = tower.state_dict()
    pos = state.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[-1] == config.width and pos.shape != expected["pos_embed"].shape:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:
            log.info("eva: %s: position embedding %d x %d -> %d x %d", path, side, side, config.grid, config.grid)
            state["pos_embed"] = resize_pos_embed(pos, config.grid)
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} {tuple(state[k].shape)} (tower {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{name}: {_listed(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise ValueError(f"{path}: does not match the EVA tower ({config.depth} blocks, {config.kept_blocks} kept, "
                         f"width {config.width}, {config.image_size} px): " + "; ".join(problems))
    tower.load_state_dict(state, strict=True)
    log.info("eva: loaded %s (%d tensors; %d of pruned blocks and %d of EVA-CLIP heads ignored)", path, len(state),
             len(pruned), len(ignored))


MODELS = ("eva_vit_g", "eva_vit_g_qformer")


def build_eva(model: str, pretrained: str | None, layer: int, overrides: dict, seed: int,
              image_size: int | None = None) -> VisionTower:
    """An EVA tower by name, random or from a checkpoint.

    Args:
        model: ``eva_vit_g`` (:class:`EVAVisionTower` with :class:`EVAConfig`'s defaults) or ``eva_vit_g_qformer``
            (Video-LLaMA's frozen boundary: that tower, ``ln_vision`` and BLIP-2's image Q-Former, 32 x 768 tokens a
            frame; built by :func:`pipeline.vision.qformer_tower.build_qformer_tower`).
        pretrained: ``None`` (random weights drawn from ``seed``, upstream's initialisation) or the EVA checkpoint
            file for :func:`load_eva_weights` (``eva_vit_g.pth``).
        layer: the returned block, counted from the end of the 40 released blocks (``-2``: BLIP-2's, Video-LLaMA's
            and E.T. Chat's ``vision_output_layer``; see :class:`EVAConfig`).
        overrides: :class:`EVAConfig` fields except ``layer`` merged over the defaults (a tiny test tower:
            ``{"width": 32, "depth": 3, "heads": 2, "patch_size": 8, "image_size": 32}``); for
            ``eva_vit_g_qformer`` also ``qformer``, the Q-Former tower's own overrides, passed on.
        seed: ``torch.manual_seed`` of the random weights (the Q-Former tower gets it too).
        image_size: pixels of the input frames, over the default and ``overrides``'.

    Raises:
        ValueError: unknown ``model`` or override field (``qformer`` with ``eva_vit_g``), an invalid config, or a
            checkpoint that does not match.
    """
    if model not in MODELS:
        raise ValueError(f"eva: unknown model {model!r}; known: {MODELS}")
    overrides = dict(overrides or {})
    qformer = overrides.pop("qformer", None)
    if qformer is not None and model != "eva_vit_g_qformer":
        raise ValueError(f"eva: override 'qformer' is for model 'eva_vit_g_qformer', not {model!r}")
    known = {f.name for f in fields(EVAConfig)} - {"layer"}
    if unknown := set(overrides) - known:
        raise ValueError(f"eva: unknown config fields {sorted(unknown)} (layer is its own argument); known: "
                         f"{sorted(known)}" + (" and qformer" if model == "eva_vit_g_qformer" else ""))
    values = {**overrides, "layer": layer}
    if image_size is not None:
        values["image_size"] = image_size
    config = EVAConfig(**values)
    torch.manual_seed(seed)
    tower = EVAVisionTower(config)
    if pretrained is None:
        log.warning("eva: %s with RANDOM weights (seed %d): %s", model, seed, asdict(config))
    else:
        load_eva_weights(tower, pretrained)
    if model == "eva_vit_g_qformer":
        from pipeline.vision.qformer_tower import build_qformer_tower

        return build_qformer_tower(tower, qformer or {}, seed)
    return tower
