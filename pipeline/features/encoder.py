"""Frame encoders: CLIP vision towers that turn frames into penultimate-layer patch tokens.

LLaVA and Video-ChatGPT take ``hidden_states[-2]`` of CLIP ViT-L/14 without the CLS token; ``layer`` selects that
block output (``-2`` = the penultimate block), and the CLS token is always dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

log = logging.getLogger(__name__)

BACKENDS = ("open_clip",)


@dataclass
class EncoderConfig:
    """Which vision tower encodes the frames.

    Attributes:
        backend: ``open_clip``.
        model: open_clip architecture name (``ViT-L-14`` for Video-ChatGPT's CLIP ViT-L/14).
        pretrained: open_clip pretrained tag (``openai``) or a local checkpoint file; ``None`` builds the
            architecture with random weights drawn from ``seed`` (the offline demo and tests).
        seed: seed of the random weights when ``pretrained`` is ``None``.
        layer: index of the transformer block whose output is taken (``-2``: penultimate).
        overrides: keyword arguments merged into the open_clip model config (``{"vision_cfg": {"layers": 2}}``).
    """

    backend: str = "open_clip"
    model: str = "ViT-L-14"
    pretrained: str | None = "openai"
    seed: int = 0
    layer: int = -2
    overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"features.backend: unknown {self.backend!r}; known: {BACKENDS}")


class FrameEncoder:
    """An open_clip vision tower in eval mode with its own preprocessing.

    Attributes:
        image_size: ``(H, W)`` pixels the tower takes.
        dim: width D of the patch tokens.
        num_patches: patches per frame S (``(H / patch) * (W / patch)``).
    """

    def __init__(self, config: EncoderConfig, device: str | torch.device = "cpu"):
        import open_clip

        if config.pretrained is None:
            torch.manual_seed(config.seed)
            log.warning("features: %s with RANDOM weights (seed %d), no pretrained CLIP", config.model, config.seed)
        model = open_clip.create_model(config.model, pretrained=config.pretrained, **config.overrides)
        preprocess = open_clip.get_model_preprocess_cfg(model)
        self.config = config
        self.device = torch.device(device)
        self.visual = model.visual.eval().requires_grad_(False).to(self.device)
        self.image_size = tuple(preprocess["size"])
        self.mean = torch.tensor(preprocess["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess["std"], device=self.device).view(1, 3, 1, 1)
        self.interpolation = TF.InterpolationMode(preprocess.get("interpolation", "bicubic"))
        self.dim = self.visual.transformer.width
        grid = self.visual.grid_size
        self.num_patches = int(grid[0] * grid[1])

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """CLIP preprocessing as open_clip's ``image_transform``: resize the short side to the tower's size
        (bicubic, antialiased), centre crop, scale to [0, 1], normalise with the tower's mean and std.

        Args:
            frames: ``(F, H, W, 3)`` uint8 RGB.

        Returns:
            ``(F, 3, H', W')`` float32 on the encoder's device.
        """
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2)
        x = TF.resize(x, [min(self.image_size)], interpolation=self.interpolation, antialias=True)
        x = TF.center_crop(x, list(self.image_size))
        return (x.float() / 255.0 - self.mean) / self.std

    @torch.inference_mode()
    def patch_tokens(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """Patch tokens of block ``config.layer`` without CLS, ``batch_size`` frames per forward pass.

        Args:
            frames: ``(F, H, W, 3)`` uint8 RGB.

        Returns:
            ``(F, S, D)`` float32 on the CPU.
        """
        pixels = self.preprocess(frames)
        out = []
        for batch in pixels.split(batch_size):
            hidden = self.visual.forward_intermediates(
                batch, indices=[self.config.layer], output_fmt="NLC", intermediates_only=True
            )["image_intermediates"][0]
            out.append(hidden.float().cpu())
        return torch.cat(out)
