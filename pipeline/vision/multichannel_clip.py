"""The SSv2 fork's video tower (github.com/SeHwanJoo/LLaVA, commit 576d339): CLIP ViT-L/14-336 whose patch embedding
reads the 16 sampled segments of a video as 16 input channels, one colour plane at a time.

What the fork does (file:line of that commit):

* ``CLIPVisionModel.from_pretrained(name, num_channels=args.num_segment, ignore_mismatched_sizes=True)``
  (llava/model/video_encoder/clip_encoder.py:13, :36-39): the pretrained 3-channel patch conv does not fit, so
  transformers draws a new one (``CLIPPreTrainedModel._init_weights``: normal, std ``initializer_range *
  initializer_factor`` = 0.02, no bias); every other weight is CLIP's. ``num_segment: 16``
  (configs/model_args/video_encoder/base.yaml:7, configs/data_args/ssv2_video.yaml:6, llava/utils/config.py:35).
* The dataset returns one video as ``(C, T, H, W)`` = ``(3, 16, 336, 336)`` (llava/dataset/video_dataset/
  dataset.py:101-102, crop 336: configs/data_args/ssv2_video.yaml:7); a batch ``(B, 3, 16, H, W)`` is concatenated
  along dim 0 (llava/model/llava_arch.py:245-252), so the tower sees ``B * 3`` "images" of 16 channels: colour
  plane c (R, G, B) of the 16 frames in time order. Each gives 576 patch tokens; per video they are split back
  (llava_arch.py:253-254) and flattened in R, G, B order (``mm_patch_merge_type`` ``flat``, the default:
  llava_arch.py:255-258, llava/utils/config.py:32): 3 x 576 = 1,728 tokens a video, no pooling.
* Features: ``hidden_states[select_layer]`` with ``mm_vision_select_layer: -2`` (clip_encoder.py:44-45,
  base.yaml:3), the CLS token dropped (``select_feature`` ``patch``: clip_encoder.py:15, :46-47).
* Pixels are normalised with ImageNet's mean and std, not CLIP's (dataset.py:100).
* The fork never trains the tower, the new conv included: ``requires_grad_(False)`` (clip_encoder.py:40), forward
  under ``torch.no_grad`` (clip_encoder.py:54), and ``tune_mm_mlp_adapter`` freezes all but the projector
  (llava/train/utils.py:478-485). Only the projector is saved (llava/train/llava_trainer.py:215-247), so its random
  conv is in no released file; it depends on ``set_seed(1997)`` (llava/train/train.py:37) and the order of RNG use.

Here: :class:`MultiChannelCLIPTower` is that tower behind :class:`~pipeline.vision.tower.VisionTower`. The new conv
is drawn from its own ``seed`` (same distribution as the fork's), so it is reproducible; its parameters are
trainable like every other (the caller freezes what a stage does not train). A checkpoint whose conv already has
``num_segments`` input channels (one this tower saved with ``tower.clip.save_pretrained``) keeps its conv.
State-dict names are ``clip.`` + ``CLIPVisionModel``'s (``clip.embeddings.patch_embedding.weight``, ...); blocks
after ``layer`` are removed and never run. :func:`tower_state_dict` renames the fork's and transformers 4's keys.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

from pipeline.vision.tower import VisionTower

log = logging.getLogger(__name__)

FORK_SEGMENTS = 16  # num_segment: configs/model_args/video_encoder/base.yaml:7
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # llava/dataset/video_dataset/dataset.py:100
IMAGENET_STD = (0.229, 0.224, 0.225)
_TOP_LEVEL = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")  # CLIPVisionModel's children


def new_patch_embedding(hidden_size: int, patch_size: int, channels: int, std: float, seed: int) -> nn.Conv2d:
    """A ``channels``-input patch conv like CLIP's (no bias), weights ~ N(0, ``std``) drawn from ``seed``: the
    distribution transformers gives the fork's mismatched conv (``_init_weights``, ``initializer_range *
    initializer_factor``), from a generator of its own so it does not depend on the global RNG."""
    conv = nn.Conv2d(channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.normal_(0.0, std, generator=generator)
    return conv


class MultiChannelCLIPTower(VisionTower):
    """The fork's multi-channel CLIP: ``(T, 3, H, W)`` normalised frames, T a multiple of ``clip_frames`` (16) ->
    ``(3 * T / 16, S, D)`` patch tokens of block ``layer`` without CLS.

    Clip k (frames ``16k .. 16k+15``) becomes three 16-channel images, its R, G and B planes in time order
    (``(16, 3, H, W)`` -> ``(3, 16, H, W)``, the fork's ``(C, T, H, W)`` layout), output frames ``3k, 3k+1, 3k+2``.
    The fork reads exactly one clip a video; more clips (32 frames = 2 clips -> 6 output frames) are read
    independently, our extension.

    A still image (T = 1) is read as a static 16-frame video, the frame in every segment: what the fork's loader
    gives a video with fewer frames than segments (frame 0 for every segment: dataset.py:154-166), so 3 output
    frames. (The fork sends images to its separate 3-channel image tower instead, llava_arch.py:249-250.)

    Args:
        model: hub name or local folder holding a CLIP config (``openai/clip-vit-large-patch14-336``).
        pretrained: None: random weights from ``seed`` (the architecture of ``model``'s config with ``overrides``);
            a folder: the weights there; any other value: the weights at ``model``.
        layer: the block whose output is taken, counted from the end (-2: penultimate, the fork's); the blocks
            after it are removed.
        overrides: ``CLIPVisionConfig`` fields, plus ``num_segments`` (default 16, the fork's).
        seed: seed of the new patch conv (and, with ``pretrained=None``, of nothing else: the caller seeds the
            global RNG for the rest, as :func:`pipeline.vision.build_tower` does).
        image_size: input side in pixels if not the config's (the position embedding is interpolated).

    Attributes:
        clip: the ``transformers.CLIPVisionModel``, its ``embeddings.patch_embedding`` a ``num_segments``-channel
            conv, ``config.num_channels == num_segments`` and ``config.num_hidden_layers == blocks``, so what
            ``clip.save_pretrained`` writes loads back as this tower (with ``layer=-1``).
        num_segments: frames folded into one input (== ``clip_frames``).
        blocks: encoder blocks kept.
        mean, std: ImageNet's (dataset.py:100).
    """

    def __init__(self, model: str, pretrained: str | None, layer: int, overrides: dict, seed: int = 0,
                 image_size: int | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        overrides = dict(overrides)
        segments = int(overrides.pop("num_segments", FORK_SEGMENTS))
        if segments < 1:
            raise ValueError(f"multichannel_clip: num_segments must be >= 1, got {segments}")
        if "num_channels" in overrides:
            raise ValueError("multichannel_clip: set num_segments, not num_channels (the conv reads one colour "
                             "plane of num_segments frames)")
        if pretrained is None:
            config = CLIPVisionConfig.from_pretrained(model, **overrides)
            config.num_channels = segments
            self.clip = CLIPVisionModel(config)
            fresh = True
        else:
            source = pretrained if Path(pretrained).is_dir() else model
            self.clip = CLIPVisionModel.from_pretrained(source, **overrides)
            fresh = self.clip.config.num_channels != segments  # a 3-channel CLIP: draw the conv, as the fork
        config = self.clip.config
        vision = getattr(self.clip, "vision_model", self.clip)  # transformers 4 nests it, 5 (pinned) does not
        embeddings = vision.embeddings
        if fresh:
            old = embeddings.patch_embedding
            conv = new_patch_embedding(config.hidden_size, config.patch_size, segments,
                                       config.initializer_range * config.initializer_factor, seed)
            embeddings.patch_embedding = conv.to(old.weight.device, old.weight.dtype)
            config.num_channels = segments
            log.info("multichannel_clip: new %d-channel patch embedding drawn from seed %d", segments, seed)
        blocks = len(vision.encoder.layers)
        if not -blocks - 1 <= layer <= -1:
            raise ValueError(f"multichannel_clip: layer counts from the end, -1 .. {-blocks - 1}, got {layer}")
        self.blocks = blocks + 1 + layer
        vision.encoder.layers = vision.encoder.layers[: self.blocks]  # the last one's output is hidden_states[layer]
        vision.post_layernorm = nn.Identity()  # only the pooled CLS reads it: no weights that never learn
        config.num_hidden_layers = self.blocks  # save_pretrained writes the pruned model (reload it with layer -1)
        self.num_segments = self.clip_frames = segments
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self._interpolate = image_size is not None and image_size != config.image_size
        side = image_size if self._interpolate else config.image_size
        self.image_size = (side, side)
        self.dim, self.heads = config.hidden_size, config.num_attention_heads
        self.grid = (side // config.patch_size, side // config.patch_size)

    def out_frames(self, frames: int) -> int:
        """3 output frames (R, G, B planes) per clip of ``clip_frames`` frames; a still image (1 frame) gives 3.

        Raises:
            ValueError: ``frames`` is neither 1 nor a positive multiple of ``clip_frames``.
        """
        if frames == 1:
            return 3
        if frames < 1 or frames % self.clip_frames:
            raise ValueError(f"multichannel_clip reads clips of {self.clip_frames} frames (or one still image), "
                             f"got {frames} frames")
        return 3 * frames // self.clip_frames

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` normalised frames of one video, in the tower's dtype -> ``(3 * T / clip_frames, S, D)``
        (T = 1: ``(3, S, D)``), same dtype; output frame ``3k + c`` is colour plane c of clip k."""
        frames, colours, height, width = pixels.shape
        if colours != 3:
            raise ValueError(f"multichannel_clip: expected (T, 3, H, W) RGB frames, got {tuple(pixels.shape)}")
        self.out_frames(frames)  # validates T
        if frames == 1:
            pixels = pixels.expand(self.clip_frames, -1, -1, -1)
        planes = (pixels.reshape(-1, self.clip_frames, 3, height, width).transpose(1, 2)
                  .reshape(-1, self.clip_frames, height, width))  # (clips * 3, segments, H, W)
        hidden = self.clip(planes, interpolate_pos_encoding=self._interpolate).last_hidden_state
        return hidden[:, 1:]  # CLS dropped (select_feature "patch")

    def tower_state_dict(self, state_dict: dict) -> dict:
        """See :func:`tower_state_dict`; the blocks this tower removed are left out."""
        return tower_state_dict(state_dict, self.blocks)


def tower_state_dict(state_dict: dict, blocks: int | None = None) -> dict:
    """The video-tower weights of a checkpoint, renamed to :class:`MultiChannelCLIPTower`'s state-dict names.

    Accepts this tower's own names (``clip.embeddings...``), ``CLIPVisionModel``'s of transformers 5
    (``embeddings...``) and 4 (``vision_model.embeddings...``), and a whole fork checkpoint (transformers 4.49,
    ``model.video_tower.vision_tower.vision_model...``, under PEFT ``base_model.model.`` before it: its video tower
    is ``self.vision_tower`` of ``LlavaMetaModel.video_tower``, llava/model/llava_arch.py:54,
    video_encoder/clip_encoder.py:36); the fork's 3-channel image tower (``image_tower.``), CLIP's text model and
    projections are left out.

    Args:
        state_dict: name -> tensor.
        blocks: encoder blocks the tower kept; blocks from this index on are left out (None: all kept).

    Returns:
        ``clip.``-prefixed names -> the same tensors.
    """
    out = {}
    for name, tensor in state_dict.items():
        if "video_tower.vision_tower." in name:
            name = name.split("video_tower.vision_tower.", 1)[1]
        elif "image_tower." in name:
            continue
        name = name.removeprefix("clip.").removeprefix("vision_model.")
        if not name.startswith(_TOP_LEVEL):
            continue
        match = re.match(r"encoder\.layers\.(\d+)\.", name)
        if blocks is not None and match and int(match.group(1)) >= blocks:
            continue
        out["clip." + name] = tensor
    return out


def build_multichannel_clip(model: str, pretrained: str | None, layer: int, overrides: dict, seed: int,
                            image_size: int | None = None) -> MultiChannelCLIPTower:
    """The fork's multi-channel CLIP tower, in float32 (see :class:`MultiChannelCLIPTower` for the arguments)."""
    return MultiChannelCLIPTower(model, pretrained, layer, overrides, seed, image_size)
