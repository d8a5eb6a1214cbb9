"""Frame encoders: CLIP vision towers that turn frames into penultimate-layer patch tokens.

LLaVA and Video-ChatGPT take ``hidden_states[-2]`` of CLIP ViT-L/14 without the CLS token; ``layer`` selects that
block output (``-2`` = the penultimate block), and the CLS token is always dropped. Two backends load the same
weights: Hugging Face ``CLIPVisionModel`` (``openai/clip-vit-large-patch14``, what Video-ChatGPT used) and
open_clip (``ViT-L-14`` / ``openai``), by name or from a local folder or file.

Preprocessing is split so that the expensive part runs in DataLoader workers: :class:`FramePrep` resizes uint8
frames to the tower's input size (no float copies of full-resolution frames), and
:meth:`FrameEncoder.normalize` scales and normalises them on the encoder's device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("open_clip", "hf_clip")
RESIZES = ("crop", "stretch")
PRECISIONS = ("auto", "float32", "float16", "bfloat16")


@dataclass
class EncoderConfig:
    """Which vision tower encodes the frames, and how frames are fitted to it.

    Attributes:
        backend: ``open_clip`` or ``hf_clip`` (``transformers.CLIPVisionModel``).
        model: open_clip architecture name (``ViT-L-14``), or for ``hf_clip`` a hub name or local folder
            (``openai/clip-vit-large-patch14``).
        pretrained: open_clip: a pretrained tag (``openai``) or a local checkpoint file. ``None`` (both backends)
            builds the architecture with random weights drawn from ``seed`` (the offline demo and tests; for
            ``hf_clip`` the architecture is the config at ``model``).
        seed: seed of the random weights when ``pretrained`` is ``None``.
        layer: which transformer block's output is taken, counted from the end (``-1``: the last, ``-2``: the
            penultimate, as ``hidden_states[-2]``); the blocks after it are pruned and never run.
        overrides: keyword arguments merged into the open_clip model config (``{"vision_cfg": {"layers": 2}}``).
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


class FrameEncoder:
    """A CLIP vision tower in eval mode.

    Attributes:
        prep: the :class:`FramePrep` of this tower.
        dim: width D of the patch tokens.
        grid: ``(rows, columns)`` of patches per frame; S = rows * columns.
        device, dtype: where and in which precision the tower runs.
    """

    def __init__(self, config: EncoderConfig, device=None):
        import torch

        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision = config.precision
        if precision == "auto":
            precision = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, precision)
        if config.pretrained is None:
            torch.manual_seed(config.seed)
            log.warning("features: %s with RANDOM weights (seed %d), no pretrained CLIP", config.model, config.seed)
        if config.backend == "open_clip":
            self._init_open_clip(config)
        else:
            self._init_hf(config)
        self.tower = self.tower.eval().requires_grad_(False).to(self.device, self.dtype)
        std = torch.tensor(self._std, device=self.device).view(1, 3, 1, 1)
        self.scale = 1.0 / (255.0 * std)  # (x / 255 - mean) / std = x * scale + shift, in two passes
        self.shift = -torch.tensor(self._mean, device=self.device).view(1, 3, 1, 1) / std
        self.prep = FramePrep(self._size, config.resize)

    def _init_open_clip(self, config: EncoderConfig) -> None:
        import open_clip

        model = open_clip.create_model(config.model, pretrained=config.pretrained, **config.overrides)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        self.tower = model.visual
        self.tower.prune_intermediate_layers([config.layer], prune_head=True)  # blocks after `layer` never run
        self._size = tuple(preprocess["size"])
        self._mean, self._std = preprocess["mean"], preprocess["std"]
        self.dim = self.tower.transformer.width
        self.grid = tuple(int(g) for g in self.tower.grid_size)

    def _init_hf(self, config: EncoderConfig) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        if config.pretrained is None:
            self.tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(config.model))
        else:
            self.tower = CLIPVisionModel.from_pretrained(config.model)
        vision = self.tower.config
        # keep the blocks up to `layer` (-2: all but the last), so that it is the last one and nothing after it runs
        encoder = getattr(self.tower, "vision_model", self.tower).encoder  # transformers 4 nests it, 5 does not
        encoder.layers = encoder.layers[: len(encoder.layers) + 1 + config.layer]
        try:
            processor = CLIPImageProcessor.from_pretrained(config.model)
            crop = processor.crop_size
            self._size = (crop["height"], crop["width"])
            self._mean, self._std = tuple(processor.image_mean), tuple(processor.image_std)
        except OSError:  # a folder without preprocessor_config.json: CLIP's defaults at the tower's size
            self._size = (vision.image_size, vision.image_size)
            self._mean, self._std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
        self.dim = vision.hidden_size
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)

    @property
    def num_patches(self) -> int:
        """Patches per frame, S."""
        return self.grid[0] * self.grid[1]

    def normalize(self, frames):
        """``(T, 3, H, W)`` uint8 from :attr:`prep` -> scaled to [0, 1] and normalised with the tower's mean and
        std, on the encoder's device, in its dtype."""
        x = frames.to(self.device, non_blocking=True).float().mul_(self.scale).add_(self.shift)
        return x.to(self.dtype)

    def patch_tokens(self, frames, batch_size: int = 32):
        """Patch tokens of block ``config.layer`` without CLS, ``batch_size`` frames per forward pass (normalised
        batch by batch, so memory holds one batch of float pixels, however long the video).

        Args:
            frames: ``(T, 3, H, W)`` uint8 from :attr:`prep`.

        Returns:
            ``(T, S, D)`` float32 on the CPU.
        """
        import torch

        with torch.inference_mode():
            return torch.cat([self._tokens(batch) for batch in frames.split(batch_size)])

    def _tokens(self, batch):
        """One batch of ``(B, 3, H, W)`` uint8 frames -> ``(B, S, D)`` float32 on the CPU."""
        batch = self.normalize(batch)
        if self.config.backend == "open_clip":
            hidden = self.tower.forward_intermediates(
                batch, indices=[-1], stop_early=True, output_fmt="NLC", intermediates_only=True
            )["image_intermediates"][0]
        else:
            hidden = self.tower(batch).last_hidden_state[:, 1:]  # the pruned tower's last block is `layer`
        return hidden.float().cpu()
