"""Training-time video augmentation and segment sampling of the SSv2 fork (github.com/SeHwanJoo/LLaVA, commit
576d339), whose video dataset is VideoMAE's SSv2 loader (llava/dataset/video_dataset/dataset.py:1 cites
MCG-NJU/VideoMAE ssv2.py).

The fork's ``VideoDataset._aug_frame`` (llava/dataset/video_dataset/dataset.py:80-134), for every training video,
in this order, with one set of random parameters for all frames of the video:

1. RandAugment ``rand-m7-n4-mstd0.5-inc1`` with bicubic resampling (dataset.py:85-89), on the PIL frames at their
   native size (dataset.py:91-93): 4 ops drawn uniformly with replacement from the 15 "increasing" ops
   (llava/dataset/video_dataset/rand_augment.py:389-405, :455-460, :499-501), each applied with probability 0.5
   (rand_augment.py:442, :354-355), magnitude ~ N(7, 0.5) clipped to [0, 10] per op (rand_augment.py:356-359),
   the same op, magnitude and sign on every frame of the list (rand_augment.py:360-365); fill grey 128
   (rand_augment.py:37, :339).
2. ImageNet normalisation (dataset.py:100), then ``(T, H, W, C)`` -> ``(C, T, H, W)`` (dataset.py:102).
3. Random resized crop to 336 (``crop_size``: configs/data_args/ssv2_video.yaml:7), scale (0.08, 1.0), aspect
   ratio (0.75, 1.3333) (dataset.py:104-120), one box for all frames, bilinear (llava/dataset/video_dataset/
   video_transforms.py:515-547, box: :473-512).
4. Horizontal flip with probability 0.5, all frames (``random_horizontal_flip=True``: dataset.py:115;
   video_transforms.py:148-169). The caption is not touched (dataset.py:65-74), so "Pushing something from left to
   right" is learnt on mirrored videos half the time; VideoMAE, whose code this is, turns the flip off for SSv2
   (VideoMAE ssv2.py:195: ``random_horizontal_flip=False if args.data_set == 'SSV2'``). Preset
   ``llava_ssv2_noflip`` does that.
5. Random erasing with probability 0.25, ``mode="pixel"``, one box (dataset.py:122-132), on ``(T, C, H, W)``:
   the "cube" mode (random_erasing.py:57, :148-164), one box for all frames, area (0.02, 1/3) of the frame, log
   aspect ratio (0.3, 1/0.3), 100 tries (random_erasing.py:108-146), filled with per-pixel N(0, 1) noise in the
   normalised space, new noise for each frame (random_erasing.py:137-145).

:class:`VideoAugment` does the same on uint8 ``(T, 3, H, W)`` tensors with torchvision.transforms.v2, before
normalisation (the tower normalises; the order of the linear normalisation and the crop does not matter).
Differences: the geometric RandAugment ops resample bilinearly (torchvision's tensor kernels have no bicubic);
erasing noise is ``mean + std * N(0, 1)`` mapped to uint8, so clipped to [0, 255]; the fork's shear is about the
top-left corner and so is ours.

The fork samples frames by segments with a random offset in each (dataset.py:153-169):
:meth:`pipeline.video.frames.FrameSampling.indices` with an ``rng``. Videos are read with decord at
their native frame rate (dataset.py:148), after a webm -> H.264 mp4 re-encode that keeps rate and size
(scripts/dataset/webm2mp4.py:26-33).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # dataset.py:100
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_LEVEL = 10.0  # rand_augment.py:41
FILL = 128  # rand_augment.py:37
# The "increasing" op set of inc1 (rand_augment.py:389-405).
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
            "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
            "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_AUGMENT_IMPLS = ("fork", "torchvision")


class _Draws:
    """Python-``random``-like draws from a ``torch.Generator`` (reproducible, independent of global state)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def random(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def randint(self, low: int, high: int) -> int:
        """Inclusive of ``high``, as ``random.randint``."""
        return int(torch.randint(low, high + 1, (), generator=self.generator))

    def gauss(self, mu: float, sigma: float) -> float:
        return mu + sigma * torch.randn((), generator=self.generator).item()

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)


def _rand_op(name: str, x: torch.Tensor, magnitude: float, draws: _Draws) -> torch.Tensor:
    """One RandAugment op of the fork (level arguments: rand_augment.py:184-266) on ``(T, 3, H, W)`` uint8."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    level = magnitude / MAX_LEVEL

    def sign() -> float:  # _randomly_negate, rand_augment.py:184-186
        return -1.0 if draws.random() > 0.5 else 1.0

    fill = [float(FILL)] * 3
    bilinear = InterpolationMode.BILINEAR
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    if name == "Invert":
        return TF.invert(x)
    if name == "Rotate":  # +-30 degrees at level 10, counter-clockwise as PIL's
        return TF.rotate(x, sign() * level * 30.0, interpolation=bilinear, fill=fill)
    if name == "PosterizeIncreasing":  # keep 4 .. 0 bits
        bits = 4 - int(level * 4)
        return TF.posterize(x, bits)
    if name == "SolarizeIncreasing":  # invert pixels >= 256 .. 0
        threshold = 256 - int(level * 256)
        return torch.where(x >= threshold, 255 - x, x)
    if name == "SolarizeAdd":  # + 0 .. 110 below 128
        add = int(level * 110)
        return torch.where(x < 128, (x.to(torch.int16) + add).clamp(max=255).to(torch.uint8), x)
    if name.endswith("Increasing"):  # Color / Contrast / Brightness / Sharpness, factor 1 +- 0 .. 0.9
        factor = 1.0 + sign() * level * 0.9
        adjust = {"ColorIncreasing": TF.adjust_saturation, "ContrastIncreasing": TF.adjust_contrast,
                  "BrightnessIncreasing": TF.adjust_brightness, "SharpnessIncreasing": TF.adjust_sharpness}[name]
        return adjust(x, factor)
    if name in ("ShearX", "ShearY"):  # PIL affine (1, f, 0, 0, 1, 0): shear about the top-left corner, f = +-0.3
        degrees = math.degrees(math.atan(sign() * level * 0.3))
        shear = [degrees, 0.0] if name == "ShearX" else [0.0, degrees]
        return TF.affine(x, angle=0.0, translate=[0.0, 0.0], scale=1.0, shear=shear, interpolation=bilinear,
                         fill=fill, center=[0.0, 0.0])
    if name in ("TranslateXRel", "TranslateYRel"):  # +-45 % of the side; PIL's offset moves the content back
        pct = sign() * level * 0.45
        height, width = x.shape[-2:]
        translate = [-pct * width, 0.0] if name == "TranslateXRel" else [0.0, -pct * height]
        return TF.affine(x, angle=0.0, translate=translate, scale=1.0, shear=[0.0, 0.0], interpolation=bilinear,
                         fill=fill)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
              draws: _Draws) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of an Inception-style crop, as the fork's ``_get_param_spatial_crop``
    (video_transforms.py:473-512: 10 tries, log-uniform aspect ratio, then a central crop)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = draws.uniform(*scale) * area
        aspect = math.exp(draws.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return draws.randint(0, height - h), draws.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _call_seed(seed: int | None, generator: torch.Generator | None) -> int:
    """The seed of one call: ``seed``, else drawn from ``generator``, else from torch's default generator (which a
    DataLoader seeds in each worker from the run's base seed)."""
    if seed is not None:
        return int(seed)
    return int(torch.randint(0, 2**62, (), generator=generator))


@dataclass(frozen=True)
class VideoAugment:
    """The fork's training augmentation of one video (picklable: it runs in DataLoader workers).

    ``(T, 3, H, W)`` uint8 RGB frames -> ``(T, 3, size, size)`` uint8, every random parameter (RandAugment ops,
    magnitudes and signs, crop box, flip, erasing box) shared by all frames; only the erasing noise differs per
    frame, as the fork's. Defaults are the fork's (see the module docstring).

    Attributes:
        size: output side (the fork: 336).
        rand_augment_ops, rand_augment_magnitude: n and m of ``rand-m7-n4`` (0 ops: no RandAugment).
        magnitude_std: std of the per-op magnitude noise (``mstd0.5``).
        op_prob: probability that each drawn op is applied (0.5).
        rand_augment_impl: ``fork`` (the fork's timm-style RandAugment, built from torchvision.transforms.v2
            functional ops) or ``torchvision`` (``v2.RandAugment(num_ops=n, magnitude=round(m / 10 * 30),
            num_magnitude_bins=31)``: the same n and m on torchvision's scale, but every op always applied, no
            magnitude noise and torchvision's op list).
        crop_scale, crop_ratio: random resized crop ranges (0.08-1.0, 0.75-1.3333).
        flip_prob: horizontal flip probability (the fork: 0.5 with unchanged captions; see the module docstring).
        erase_prob: random erasing probability (0.25).
        mean, std: normalisation the erasing noise is drawn in (ImageNet's).
    """

    size: int
    rand_augment_ops: int = 4
    rand_augment_magnitude: float = 7.0
    magnitude_std: float = 0.5
    op_prob: float = 0.5
    rand_augment_impl: str = "fork"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)
    flip_prob: float = 0.5
    erase_prob: float = 0.25
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.rand_augment_impl not in RAND_AUGMENT_IMPLS:
            raise ValueError(f"rand_augment_impl: unknown {self.rand_augment_impl!r}; known: {RAND_AUGMENT_IMPLS}")
        if self.size < 1:
            raise ValueError(f"augment size must be >= 1, got {self.size}")

    def __call__(self, frames: torch.Tensor, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment one video.

        Args:
            frames: ``(T, 3, H, W)`` uint8 RGB, T >= 1.
            seed: the seed of this call (the same seed gives the same output); else drawn from ``generator``,
                else from torch's default generator.

        Returns:
            ``(T, 3, size, size)`` uint8, contiguous.
        """
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 1:
            raise ValueError(f"augment expects (T, 3, H, W) uint8 frames, got {tuple(frames.shape)} {frames.dtype}")
        # One generator per step, so that switching a step off does not move the others' draws.
        stages = torch.randint(0, 2**62, (4,), generator=torch.Generator().manual_seed(_call_seed(seed, generator)))
        x = self._rand_augment(frames, int(stages[0]))
        top, left, h, w = _crop_box(x.shape[-2], x.shape[-1], self.crop_scale, self.crop_ratio, _Draws(int(stages[1])))
        x = TF.resized_crop(x, top, left, h, w, [self.size, self.size], interpolation=InterpolationMode.BILINEAR,
                            antialias=False)  # the fork: F.interpolate bilinear, align_corners=False
        if _Draws(int(stages[2])).random() < self.flip_prob:
            x = x.flip(-1)
        return self._erase(x, _Draws(int(stages[3]))).contiguous()

    def _rand_augment(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self.rand_augment_ops <= 0:
            return x
        if self.rand_augment_impl == "torchvision":
            from torchvision.transforms import v2

            transform = v2.RandAugment(num_ops=self.rand_augment_ops,
                                       magnitude=int(round(self.rand_augment_magnitude / MAX_LEVEL * 30)),
                                       num_magnitude_bins=31, interpolation=v2.InterpolationMode.BILINEAR,
                                       fill=FILL)
            with torch.random.fork_rng(devices=[]):  # v2 draws from the global generator
                torch.manual_seed(seed)
                return transform(x)
        draws = _Draws(seed)
        for _ in range(self.rand_augment_ops):
            name = RAND_OPS[draws.randint(0, len(RAND_OPS) - 1)]
            if self.op_prob < 1.0 and draws.random() > self.op_prob:
                continue
            magnitude = self.rand_augment_magnitude
            if self.magnitude_std > 0:
                magnitude = draws.gauss(magnitude, self.magnitude_std)
            x = _rand_op(name, x, min(MAX_LEVEL, max(0.0, magnitude)), draws)
        return x

    def _erase(self, x: torch.Tensor, draws: _Draws) -> torch.Tensor:
        """The fork's cube random erasing (random_erasing.py:108-146): one box on every frame."""
        if draws.random() > self.erase_prob:
            return x
        frames, colours, height, width = x.shape
        log_aspect = (math.log(0.3), math.log(1 / 0.3))
        for _ in range(100):
            target = draws.uniform(0.02, 1 / 3) * height * width
            aspect = math.exp(draws.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top, left = draws.randint(0, height - h), draws.randint(0, width - w)
                mean = torch.tensor(self.mean).view(1, 3, 1, 1)
                std = torch.tensor(self.std).view(1, 3, 1, 1)
                noise = (mean + std * draws.normal((frames, colours, h, w))).mul(255).round().clamp(0, 255)
                x = x.clone()
                x[:, :, top:top + h, left:left + w] = noise.to(torch.uint8)
                return x
        return x


@dataclass(frozen=True)
class NoAugment:
    """No augmentation: ``(T, 3, H, W)`` uint8 -> short side to ``size`` (bicubic, antialiased), centre crop,
    ``(T, 3, size, size)`` uint8 (the ``crop`` fit of :class:`pipeline.features.encoder.FramePrep`); ``seed`` and
    ``generator`` are accepted and ignored."""

    size: int

    def __call__(self, frames: torch.Tensor, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        x = TF.resize(frames, [self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return TF.center_crop(x, [self.size, self.size]).contiguous()


AUGMENTATIONS = {
    "none": NoAugment,
    "llava_ssv2": VideoAugment,  # the fork's, flip included
    "llava_ssv2_noflip": functools.partial(VideoAugment, flip_prob=0.0),  # VideoMAE's SSv2 setting (ssv2.py:195)
}


def build_augment(name: str, size: int):
    """The augmentation preset ``name`` (a key of :data:`AUGMENTATIONS`) for ``size`` px output.

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; known: {tuple(AUGMENTATIONS)}")
    return AUGMENTATIONS[name](size)
