"""Frame encoders: a vision tower (:mod:`pipeline.vision`) in eval mode that turns frames into patch tokens.

LLaVA and Video-ChatGPT take ``hidden_states[-2]`` of CLIP ViT-L/14 without the CLS token; ``layer`` selects that
block output (``-2`` = the penultimate block), and the CLS token is always dropped. The towers are those a training
stage with online vision runs inside its step (:func:`pipeline.vision.build_tower`), so the cached and the online
path give the same tokens for the same frames.

Preprocessing is split so that the expensive part runs in DataLoader workers: :class:`FramePrep` resizes uint8
frames to the tower's input size (no float copies of full-resolution frames), and :func:`normalize` scales and
normalises them on the tower's device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.vision import BACKENDS

RESIZES = ("crop", "stretch")
PRECISIONS = ("auto", "float32", "float16", "bfloat16")


@dataclass
class EncoderConfig:
    """Which vision tower encodes the frames, and how frames are fitted to it.

    Attributes:
        backend: one of :data:`pipeline.vision.BACKENDS`: ``open_clip``, ``hf_clip``
            (``transformers.CLIPVisionModel``), ``multichannel_clip`` (the SSv2 fork's), ``umt`` (UMT-L) or ``eva``
            (EVA-ViT-G).
        model: open_clip architecture name (``ViT-L-14``); for ``hf_clip`` and ``multichannel_clip`` a hub name or
            local folder (``openai/clip-vit-large-patch14``); for ``umt`` ``umt-l`` or ``umt-hd-large``; for ``eva``
            ``eva_vit_g`` (patch tokens) or ``eva_vit_g_qformer`` (BLIP-2's image Q-Former's 32 tokens a frame).
        pretrained: open_clip: a pretrained tag (``openai``) or a local checkpoint file; ``umt``: the released
            ``UMT-L_f4_vision.pt``; ``eva``: ``eva_vit_g.pth``. ``None`` (every backend) builds the architecture
            with random weights drawn from ``seed`` (the offline demo and tests; for ``hf_clip`` the architecture is
            the config at ``model``).
        seed: seed of the random weights when ``pretrained`` is ``None``.
        layer: which transformer block's output is taken, counted from the end (``-1``: the last, ``-2``: the
            penultimate, as ``hidden_states[-2]``); the blocks after it are pruned and never run.
        overrides: keyword arguments merged into the architecture's config (open_clip:
            ``{"vision_cfg": {"layers": 2}}``; ``hf_clip``: ``CLIPVisionConfig`` fields; ``umt``: ``UMTConfig``
            fields; ``eva``: ``EVAConfig`` fields, and ``qformer`` for ``eva_vit_g_qformer``: its ``pretrained``
            BLIP-2 checkpoint).
        resize: ``crop`` (short side to the tower's size, bicubic with antialiasing, centre crop: open_clip and
            CLIP's own preprocessing, aspect ratio kept) or ``stretch`` (Video-ChatGPT: nearest-neighbour resize of
            the whole frame to the tower's size, aspect ratio not kept).
        precision: ``auto`` (float16 on a GPU, float32 on the CPU), ``float32``, ``float16`` or ``bfloat16``.
    """

    backend: str = "open_clip"
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    seed: int = 0
    layer: int = -2
    overrides: dict = field(default_factory=dict)
    resize: str = "crop"
    precision: str = "auto"

    def __post_init__(self) -> None:
        for key, known in (("backend", BACKENDS), ("resize", RESIZES), ("precision", PRECISIONS)):
            if getattr(self, key) not in known:
                raise ValueError(f"features.{key}: unknown {getattr(self, key)!r}; known: {known}")
        if self.layer > -1:
            raise ValueError(f"features.layer: count from the end (-1 last, -2 penultimate), got {self.layer}")


@dataclass(frozen=True)
class FramePrep:
    """Fits uint8 frames to a tower's input size (picklable: it runs in DataLoader workers).

    Attributes:
        size: ``(H, W)`` pixels of the tower's input.
        mode: ``crop`` or ``stretch`` (see :class:`EncoderConfig`).
    """

    size: tuple[int, int]
    mode: str

    def __call__(self, frames: np.ndarray):
        """``(T, H, W, 3)`` uint8 RGB -> ``(T, 3, size[0], size[1])`` uint8 tensor."""
        import torch
        from torchvision.transforms.v2 import functional as TF

        x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
        if self.mode == "stretch":
            # Video-ChatGPT load_video: F.interpolate(float frames, size=(224, 224)) (nearest), back to uint8; its
            # CLIPImageProcessor then resizes 224 -> 224 and centre-crops 224 of 224, which change nothing. Nearest
            # picks the same pixels from uint8 frames, ten times faster than through float.
            if tuple(x.shape[-2:]) != self.size:
                x = torch.nn.functional.interpolate(x, size=self.size)
            return x
        x = TF.resize(x, [min(self.size)], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(x, list(self.size))


def normalize(pixels, tower):
    """``(T, 3, H, W)`` uint8 frames -> scaled to [0, 1] and normalised with the tower's mean and std, on the
    tower's device, in its dtype (float32 arithmetic)."""
    import torch

    weight = next(tower.parameters())
    mean = torch.tensor(tower.mean, device=weight.device).view(1, 3, 1, 1)
    std = torch.tensor(tower.std, device=weight.device).view(1, 3, 1, 1)
    x = pixels.to(weight.device, non_blocking=True).float().div_(255.0).sub_(mean).div_(std)
    return x.to(weight.dtype)


class FrameEncoder:
    """A vision tower in eval mode, its weights frozen.

    Attributes:
        tower: the :class:`~pipeline.vision.tower.VisionTower`.
        prep: the :class:`FramePrep` of this tower.
        dim: width D of the patch tokens.
        grid: ``(rows, columns)`` of patches per frame; S = rows * columns.
        device, dtype: where and in which precision the tower runs.
    """

    def __init__(self, config: EncoderConfig, device=None):
        import torch

        from pipeline.vision import build_tower

        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = config.precision
        if precision == "auto":
            precision = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, precision)
        tower = build_tower(config.backend, config.model, config.pretrained, config.layer, config.overrides,
                            config.seed)
        self.tower = tower.eval().requires_grad_(False).to(self.device, self.dtype)
        self.prep = FramePrep(tuple(tower.image_size), config.resize)
        self.dim, self.grid = tower.dim, tuple(tower.grid)

    @property
    def num_patches(self) -> int:
        """Patches per frame, S."""
        return self.grid[0] * self.grid[1]

    def normalize(self, frames):
        """:func:`normalize` with this tower."""
        return normalize(frames, self.tower)

    def patch_tokens(self, frames, batch_size: int = 32):
        """Patch tokens of block ``config.layer`` without CLS, about ``batch_size`` frames per forward pass (a whole
        number of the tower's clips; normalised batch by batch, so memory holds one batch of float pixels, however
        long the video).

        Args:
            frames: ``(T, 3, H, W)`` uint8 from :attr:`prep`.

        Returns:
            ``(T', S, D)`` float32 on the CPU (T' = ``tower.out_frames(T)``).
        """
        import torch

        clip = self.tower.clip_frames if len(frames) > 1 else 1
        step = max(clip, batch_size - batch_size % clip)
        with torch.inference_mode():
            return torch.cat([self.tower(self.normalize(batch)).float().cpu() for batch in frames.split(step)])
