"""Vision towers, one module per family, behind one interface (:class:`pipeline.vision.tower.VisionTower`):
:mod:`~pipeline.vision.clip` (open_clip, Hugging Face CLIP), :mod:`~pipeline.vision.multichannel_clip` (the SSv2
fork's), :mod:`~pipeline.vision.umt` (VideoChat-Flash's UMT-L), :mod:`~pipeline.vision.eva` (EVA-ViT-G, the frozen
encoder of BLIP-2, Video-LLaMA and E.T. Chat; ``eva_vit_g_qformer`` adds BLIP-2's image Q-Former). :func:`build_tower`
makes the one a config names."""

from __future__ import annotations

import logging

BACKENDS = ("open_clip", "hf_clip", "multichannel_clip", "umt", "eva")

log = logging.getLogger(__name__)


def build_tower(backend: str, model: str, pretrained: str | None, layer: int, overrides: dict, seed: int = 0,
                image_size: int | None = None):
    """The :class:`~pipeline.vision.tower.VisionTower` of ``backend`` (one of :data:`BACKENDS`), in float32, in
    train mode, every parameter trainable (the caller freezes what its stage does not train).

    Args:
        model, pretrained, layer, overrides: see :class:`pipeline.features.encoder.EncoderConfig`.
        seed: seed of the random weights when ``pretrained`` is None (and of weights a family adds, such as the
            multi-channel patch embedding), drawn from a forked random state: the caller's stream is untouched.
        image_size: input side in pixels when a stage reads frames at another size than the tower's own
            (VideoChat-Flash's 448 px stage 4); None: the tower's.

    Raises:
        ValueError: unknown ``backend``.
    """
    import torch

    if pretrained is None:
        log.warning("vision tower: %s %s with RANDOM weights (seed %d), nothing pretrained", backend, model, seed)
    with torch.random.fork_rng(devices=[]):  # the tower's draws never move the stage's own random stream
        torch.manual_seed(seed)
        return _build(backend, model, pretrained, layer, overrides, seed, image_size)


def _build(backend: str, model: str, pretrained: str | None, layer: int, overrides: dict, seed: int,
           image_size: int | None):
    if backend == "open_clip":
        from pipeline.vision.clip import OpenCLIPTower

        return OpenCLIPTower(model, pretrained, layer, overrides, image_size)
    if backend == "hf_clip":
        from pipeline.vision.clip import HFCLIPTower

        return HFCLIPTower(model, pretrained, layer, overrides, image_size)
    if backend == "multichannel_clip":
        from pipeline.vision.multichannel_clip import build_multichannel_clip

        return build_multichannel_clip(model, pretrained, layer, overrides, seed, image_size)
    if backend == "umt":
        from pipeline.vision.umt import build_umt

        return build_umt(model, pretrained, layer, overrides, seed, image_size)
    if backend == "eva":
        from pipeline.vision.eva import build_eva

        return build_eva(model, pretrained, layer, overrides, seed, image_size)
    raise ValueError(f"unknown vision tower backend {backend!r}; known: {BACKENDS}")
