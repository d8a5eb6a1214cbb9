"""UMT-L: the video ViT that VideoChat-Flash uses as its vision tower, written from its published architecture.

VideoChat-Flash (OpenGVLab/VideoChat-Flash, ``llava-train_videochat``, read at commit 2f8e2f5) encodes a video as
clips of ``mm_local_num_frames`` = 4 consecutive frames: each clip is one ``(C, 4, H, W)`` input of the ViT, whose
attention runs over the patches of all 4 frames together, and whose output is ``(4, S, D)`` patch tokens of the
block ``mm_vision_select_layer`` = -2, followed by a LayerNorm. A still image is a clip of one frame with its own,
purely spatial position embedding. The architecture facts below cite ``umt/vit.py`` (``vit.py``),
``umt_encoder.py``, ``builder.py`` (all under ``llava/model/multimodal_encoder/``) and ``llava/model/llava_arch.py``
by line:

- Patches: a ``Conv3d`` of kernel = stride = ``(tubelet 1, 16, 16)``, tokens in ``(t, h, w)`` order, no CLS token
  (vit.py:160-164, 172; umt_encoder.py:98-104).
- Position embeddings: fixed sin-cos tables, not parameters and not in the checkpoint (``use_learnable_pos_emb``
  False, vit.py:359, 286-293): ``pos[p, j] = sin/cos(p / 10000 ** (2 * (j // 2) / D))``, sin on even ``j``, cos on
  odd (vit.py:181, 192-193), over the ``frames x 14 x 14`` positions UMT-L was pretrained on (4 frames,
  ``ckpt_num_frame``, vit.py:364; 14 x 14 = 224 px / 16, vit.py:228, 290). At another resolution (``umt-hd-large``:
  448 px, builder.py:24-25) the table is resized per frame to the new grid, bicubic (vit.py:288-289, 233-239); at
  another frame count it is resized in time, linear (vit.py:183-203, 241-253). Images use a 1-frame table
  (vit.py:290, 293, 318-319).
- Blocks: pre-norm, ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``, LayerNorm eps 1e-6 (vit.py:138-141, 357), no
  layer scale (``init_values`` 0, vit.py:132-136, 358), no dropout or drop path (umt_encoder.py:102).
- Attention: ``qkv`` a bias-free ``Linear(D, 3D)`` plus ``q_bias`` and ``v_bias`` parameters, the key bias zero
  (vit.py:64-70, 88-91; ``qkv_bias`` True, vit.py:352), scale ``head_dim ** -0.5`` (vit.py:62), ``proj``
  ``Linear(D, D)`` (vit.py:82). MLP: ``fc1`` ``Linear(D, 4D)``, exact GELU, ``fc2`` (vit.py:33-49, 129-130).
- Depth: only ``depth + return_index + 1`` blocks are built (vit.py:275, 296-301): with ``return_index`` =
  ``mm_vision_select_layer`` = -2 (umt_encoder.py:141; the training scripts' ``--mm_vision_select_layer -2``), 23
  of 24; then ``vision_layernorm``, LayerNorm eps 1e-12 (vit.py:303-304, 333; ``with_ln=True``, umt_encoder.py:108).
- UMT-L: D 1024, 24 blocks, 16 heads, 16 px patches, 224 px, 4 frames (umt_encoder.py:72-82, 96-109).
- Pixels: ImageNet mean/std (umt_encoder.py:31).
- Calls: a video ``(B, T, C, H, W)`` is permuted to ``(B, C, T, H, W)`` with ``use_image=(T == 1)``
  (umt_encoder.py:176-178) and the output viewed as ``(B, T, L, C)`` (vit.py:413-419); a video of N frames is
  reshaped into N / 4 clips (llava_arch.py:280-282), an image into a clip of one frame (llava_arch.py:273-275).
- Weights: ``UMT-L_f4_vision.pt``; of its keys only ``encoder.*`` are kept, ``encoder.norm`` renamed
  ``encoder.vision_layernorm`` (umt_encoder.py:112-127).

Differences from upstream, none of which changes the numbers beyond rounding: attention is
``scaled_dot_product_attention`` (upstream: flash-attn 2, vit.py:93-95); the qkv bias is added after calling the
``qkv`` module (upstream passes ``qkv.weight`` to ``F.linear``, vit.py:91, which would bypass a LoRA adapter on
``qkv``); activation checkpointing is off unless asked for (upstream checkpoints all 24 blocks,
umt_encoder.py:105-106); and the loader is strict (upstream loads with ``strict=False``, umt_encoder.py:127).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.vision.tower import VisionTower

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class UMTConfig:
    """The shape of a UMT ViT; the defaults are UMT-L as VideoChat-Flash builds it (umt_encoder.py:72-82, 96-109).

    Attributes:
        image_size: pixels of the square input frames (224; ``umt-hd-large``: 448).
        patch_size: pixels of a square patch (16).
        dim: D, the token width (1024).
        depth: blocks of the full model, as in the checkpoint (24).
        heads: attention heads (16).
        mlp_ratio: MLP hidden width / D (4).
        num_frames: frames of one clip, VideoChat-Flash's ``mm_local_num_frames`` (4).
        tubelet_size: frames per patch in time (1; the only value upstream's output reshape supports, vit.py:417).
        layer: the block whose output is returned, counted from the end as upstream's ``return_index``
            (``-1``: the last, ``-2``: the penultimate); the ``-layer - 1`` blocks after it are not built.
        qkv_bias: learned query and value biases (``q_bias``, ``v_bias``; the key bias is zero).
        init_values: layer scale ``gamma_1``/``gamma_2`` initial value; 0 = no layer scale (UMT-L).
        norm_eps: eps of the blocks' LayerNorms (1e-6).
        final_norm_eps: eps of ``vision_layernorm`` (1e-12).
        pretrain_image_size: the resolution the sin-cos grid is laid out at before resizing (224: a 14 x 14 grid).
        pretrain_frames: the frames the sin-cos table is laid out for before resizing in time (4).
    """

    image_size: int = 224
    patch_size: int = 16
    dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    num_frames: int = 4
    tubelet_size: int = 1
    layer: int = -2
    qkv_bias: bool = True
    init_values: float = 0.0
    norm_eps: float = 1e-6
    final_norm_eps: float = 1e-12
    pretrain_image_size: int = 224
    pretrain_frames: int = 4

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"umt: dim {self.dim} is not a multiple of heads {self.heads}")
        for key in ("image_size", "pretrain_image_size"):
            if getattr(self, key) % self.patch_size:
                raise ValueError(f"umt: {key} {getattr(self, key)} is not a multiple of patch_size {self.patch_size}")
        if self.tubelet_size != 1:
            raise ValueError(f"umt: tubelet_size {self.tubelet_size}: only 1 is supported (as upstream's reshape of "
                             "the output to one token set per input frame)")
        if self.num_frames < 1 or self.pretrain_frames < 1:
            raise ValueError(f"umt: num_frames {self.num_frames} / pretrain_frames {self.pretrain_frames} < 1")
        if not -self.depth <= self.layer <= -1:
            raise ValueError(f"umt: layer counts from the end (-1 last, -2 penultimate), within -{self.depth}..-1 "
                             f"for depth {self.depth}; got {self.layer}")

    @property
    def kept_blocks(self) -> int:
        """Blocks that are built and run: ``depth + layer + 1`` (vit.py:275)."""
        return self.depth + self.layer + 1

    @property
    def grid(self) -> int:
        """Patches per side of a frame."""
        return self.image_size // self.patch_size


def sincos_table(positions: int, dim: int) -> torch.Tensor:
    """The 1-D sin-cos table of vit.py:180-193: ``(positions, dim)`` float32 with
    ``[p, j] = sin(p / 10000 ** (2 * (j // 2) / dim))`` for even ``j`` and ``cos`` of the same for odd ``j``,
    computed in float64 as upstream's numpy."""
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    table = torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float()


def position_embedding(frames: int, grid: int, dim: int, pretrain_frames: int, pretrain_grid: int) -> torch.Tensor:
    """UMT's fixed position embedding for ``frames`` frames of ``grid x grid`` patches: ``(1, frames * grid**2, dim)``
    float32, in the patch tokens' ``(t, h, w)`` order.

    The sin-cos table is laid out over ``pretrain_frames x pretrain_grid x pretrain_grid`` positions, resized per
    frame to ``grid`` (bicubic, ``align_corners=False``) when the grids differ, then in time to ``frames`` (linear)
    when the frame counts differ: vit.py:183-203 (224 px) and vit.py:211-255 (other resolutions), which both reduce to
    this. The image embedding is the case ``frames = pretrain_frames = 1`` (vit.py:290, 293).
    """
    table = sincos_table(pretrain_frames * pretrain_grid**2, dim).reshape(pretrain_frames, pretrain_grid,
                                                                          pretrain_grid, dim)
    if grid != pretrain_grid:
        table = F.interpolate(table.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
        table = table.permute(0, 2, 3, 1)  # (T0, grid, grid, dim)
    if frames != pretrain_frames:
        table = table.permute(1, 2, 3, 0).reshape(grid * grid, dim, pretrain_frames)
        table = F.interpolate(table, size=frames, mode="linear")
        table = table.reshape(grid, grid, dim, frames).permute(3, 0, 1, 2)  # (frames, grid, grid, dim)
    return table.reshape(1, frames * grid * grid, dim).contiguous()


class PatchEmbed(nn.Module):
    """``(B, 3, T, H, W)`` pixels -> ``(B, T * S, D)`` patch tokens in ``(t, h, w)`` order (vit.py:148-173)."""

    def __init__(self, config: UMTConfig):
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv3d(3, config.dim, kernel_size=(config.tubelet_size, p, p),
                              stride=(config.tubelet_size, p, p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention over all tokens of a clip, ``(B, N, D) -> (B, N, D)`` (vit.py:51-112)."""

    def __init__(self, config: UMTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        if config.qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(config.dim))
            self.v_bias = nn.Parameter(torch.zeros(config.dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(config.dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x)  # the module is called (not its weight), so that a LoRA adapter on it takes part
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        q, k, v = qkv.reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # scale (d/h) ** -0.5, as vit.py:62
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """``fc1``, exact GELU, ``fc2`` (vit.py:33-49)."""

    def __init__(self, config: UMTConfig):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.fc1 = nn.Linear(config.dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer block, ``(B, N, D) -> (B, N, D)`` (vit.py:117-145)."""

    def __init__(self, config: UMTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = Mlp(config)
        if config.init_values > 0:
            self.gamma_1 = nn.Parameter(torch.full((config.dim,), float(config.init_values)))
            self.gamma_2 = nn.Parameter(torch.full((config.dim,), float(config.init_values)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma_1 is None:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class UMTEncoder(nn.Module):
    """Upstream's ``PretrainVisionTransformerEncoder`` (vit.py:258-338): ``(B, 3, T, H, W)`` -> ``(B, T * S, D)``.

    The position embeddings are non-persistent buffers (moved and cast with the module, never in ``state_dict``),
    float32 until the module is cast; upstream keeps them as float32 attributes cast to the input's dtype at use
    (vit.py:319, 321), which gives the same values.
    """

    def __init__(self, config: UMTConfig):
        super().__init__()
        self.patch_embed = PatchEmbed(config)
        pretrain_grid = config.pretrain_image_size // config.patch_size
        self.register_buffer("pos_embed", position_embedding(
            config.num_frames // config.tubelet_size, config.grid, config.dim, config.pretrain_frames, pretrain_grid),
            persistent=False)
        self.register_buffer("img_pos_embed", position_embedding(1, config.grid, config.dim, 1, pretrain_grid),
                             persistent=False)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.kept_blocks))
        self.vision_layernorm = nn.LayerNorm(config.dim, eps=config.final_norm_eps)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, use_image: bool = False, checkpointing: bool = False) -> torch.Tensor:
        """``(B, 3, T, H, W)`` pixels -> ``(B, T * S, D)``; ``use_image``: the 1-frame position embedding (T = 1);
        ``checkpointing`` (or :attr:`gradient_checkpointing`): recompute each block in backward while training."""
        x = self.patch_embed(x)
        x = x + (self.img_pos_embed if use_image else self.pos_embed).to(x.dtype)
        checkpointing = (checkpointing or self.gradient_checkpointing) and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.vision_layernorm(x)


class UMTVisionTower(VisionTower):
    """UMT as a :class:`~pipeline.vision.tower.VisionTower`: ``(T, 3, H, W)`` frames of one video -> ``(T, S, D)``.

    The video is cut into ``T / clip_frames`` consecutive clips, encoded as one batch (llava_arch.py:280-282); a
    single frame is a still image, encoded alone with the image position embedding (``use_image``,
    umt_encoder.py:176-178). Tokens of a clip attend to each other across its frames, never across clips.

    ``state_dict()`` keys are upstream's ``PretrainVisionTransformer``'s: ``encoder.patch_embed.proj.*``,
    ``encoder.blocks.{i}.{norm1,attn.q_bias,attn.v_bias,attn.qkv.weight,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`` for the
    kept blocks, ``encoder.vision_layernorm.*``. Set ``gradient_checkpointing = True`` (here or on
    :attr:`encoder`; Hugging Face's ``gradient_checkpointing_enable`` sets both) to recompute the blocks in backward
    while training.

    Attributes:
        config: the :class:`UMTConfig`.
        encoder: the :class:`UMTEncoder`.
    """

    def __init__(self, config: UMTConfig):
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.grid = (config.grid, config.grid)
        self.clip_frames = config.num_frames
        self.image_size = (config.image_size, config.image_size)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.heads = config.heads
        self.encoder = UMTEncoder(config)
        self.gradient_checkpointing = False
        self.apply(_init_weights)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens of block ``config.layer``, after ``vision_layernorm``.

        Args:
            pixels: ``(T, 3, H, W)`` normalised frames of one video, ``(H, W)`` = :attr:`image_size`, T = 1 (an
                image) or a multiple of :attr:`clip_frames`; any float dtype (computed in the tower's).

        Returns:
            ``(T, S, D)`` tokens in the dtype of ``pixels``.

        Raises:
            ValueError: wrong shape, or a frame count that is not 1 nor a multiple of :attr:`clip_frames`.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != self.image_size:
            raise ValueError(f"umt: expected (T, 3, {self.image_size[0]}, {self.image_size[1]}) frames, got "
                             f"{tuple(pixels.shape)}")
        frames = pixels.shape[0]
        use_image = frames == 1
        if not use_image and frames % self.clip_frames:
            raise ValueError(f"umt: {frames} frames is not one image nor a multiple of {self.clip_frames}-frame clips")
        clip = 1 if use_image else self.clip_frames
        x = pixels.to(self.encoder.patch_embed.proj.weight.dtype)
        x = x.reshape(frames // clip, clip, *pixels.shape[1:]).transpose(1, 2)  # (B, 3, clip, H, W)
        tokens = self.encoder(x, use_image=use_image, checkpointing=self.gradient_checkpointing)  # (B, clip * S, D)
        return tokens.reshape(frames, self.num_patches, self.dim).to(pixels.dtype)


def _init_weights(module: nn.Module) -> None:
    """Upstream's random initialisation (vit.py:398-407): Xavier-uniform Linear weights, zero biases, LayerNorm 1/0;
    the patch Conv3d keeps PyTorch's default, ``q_bias``/``v_bias`` start at zero."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


_BLOCK_KEY = re.compile(r"encoder\.blocks\.(\d+)\.")


def upstream_state_dict(state: dict, path: str = "checkpoint") -> dict:
    """The keys upstream's ``build_vit`` keeps from a UMT checkpoint (umt_encoder.py:119-126): ``encoder.*`` only,
    ``encoder.norm*`` renamed ``encoder.vision_layernorm*``.

    Raises:
        ValueError: ``state`` is not a flat mapping of names to tensors.
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a UMT checkpoint (expected a flat dict of tensors, as UMT-L_f4_vision.pt)")
    kept = {}
    for key, value in state.items():
        if key.startswith("encoder.norm"):
            kept["encoder.vision_layernorm" + key[len("encoder.norm"):]] = value
        elif key.startswith("encoder."):
            kept[key] = value
    return kept


def _listed(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")


def load_umt_weights(tower: UMTVisionTower, path: str) -> None:
    """Load a UMT checkpoint (``UMT-L_f4_vision.pt``) into ``tower``, in place.

    The file is read with ``torch.load(weights_only=True, mmap=True)`` (tensors only, no pickled code), filtered and
    renamed as upstream (:func:`upstream_state_dict`). The checkpoint's blocks after ``tower.config.layer`` (index
    ``kept_blocks`` up to ``depth - 1``; upstream builds 23 of the 24 and loads with ``strict=False``) are ignored,
    since the tower does not have them; every other key must match the tower's, name and shape.

    The position embeddings are not in the checkpoint: they are UMT's fixed sin-cos tables, which the tower computes
    for its own ``image_size`` and ``num_frames`` (resized bicubic from the 14 x 14 pretraining grid at 448 px, as
    upstream, vit.py:288-290), so a 224 px checkpoint loads into a tower of any resolution.

    Raises:
        ValueError: naming ``path`` and the missing, unexpected or mis-shaped keys.
    """
    state = upstream_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True), str(path))
    config = tower.config
    pruned = {k for k in state
              if (m := _BLOCK_KEY.match(k)) and config.kept_blocks <= int(m.group(1)) < config.depth}
    state = {k: v for k, v in state.items() if k not in pruned}
    expected = tower.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    shapes = [f"{k} {tuple(state[k].shape)} (tower {tuple(v.shape)})" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        problems = [f"{name}: {_listed(keys)}" for name, keys in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if keys]
        raise ValueError(f"{path}: does not match the UMT tower ({config.depth} blocks, {config.kept_blocks} kept, dim "
                         f"{config.dim}): " + "; ".join(problems))
    tower.load_state_dict(state, strict=True)
    log.info("umt: loaded %s (%d tensors; %d of pruned blocks ignored)", path, len(state), len(pruned))


MODELS = {"umt-l": {}, "umt-hd-large": {"image_size": 448}}


def build_umt(model: str, pretrained: str | None, layer: int, overrides: dict, seed: int,
              image_size: int | None = None) -> UMTVisionTower:
    """A UMT tower by name, random or from a checkpoint.

    Args:
        model: ``umt-l`` (:class:`UMTConfig`'s defaults) or ``umt-hd-large`` (the same at 448 px, builder.py:24-25).
        pretrained: ``None`` (random weights drawn from ``seed``, upstream's initialisation) or a checkpoint file
            for :func:`load_umt_weights`.
        layer: the returned block, counted from the end (``-2``, VideoChat-Flash's ``mm_vision_select_layer``).
        overrides: :class:`UMTConfig` fields merged over the model's (``{"dim": 32, "depth": 2, "heads": 2,
            "image_size": 32}``).
        seed: ``torch.manual_seed`` of the random weights.
        image_size: pixels of the input frames, over the model's and ``overrides``'.

    Raises:
        ValueError: unknown ``model`` or override field, an invalid config, or a checkpoint that does not match.
    """
    if model not in MODELS:
        raise ValueError(f"umt: unknown model {model!r}; known: {tuple(MODELS)}")
    known = {f.name for f in fields(UMTConfig)}
    if unknown := set(overrides) - known:
        raise ValueError(f"umt: unknown config fields {sorted(unknown)}; known: {sorted(known)}")
    values = {**MODELS[model], **overrides, "layer": layer}
    if image_size is not None:
        values["image_size"] = image_size
    config = UMTConfig(**values)
    torch.manual_seed(seed)
    tower = UMTVisionTower(config)
    if pretrained is None:
        log.warning("umt: %s with RANDOM weights (seed %d): %s", model, seed, asdict(config))
    else:
        load_umt_weights(tower, pretrained)
    return tower
