"""CLIP vision towers: open_clip and Hugging Face ``CLIPVisionModel``, the penultimate-block patch tokens LLaVA and
Video-ChatGPT read (``hidden_states[-2]`` without CLS; ``layer`` selects the block, counted from the end).

Both load the same weights: ``openai/clip-vit-large-patch14`` (Hugging Face, what Video-ChatGPT used) or open_clip's
``ViT-L-14`` / ``openai``, by name or from a local folder or file; ``pretrained=None`` builds the architecture with
random weights drawn from ``seed`` (the offline demo and tests). Blocks after ``layer`` are removed and never run.
"""

from __future__ import annotations

import torch

from pipeline.vision.tower import VisionTower

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPTower(VisionTower):
    """open_clip's ``model.visual`` (``ViT-L-14`` with ``pretrained="openai"``), pruned after block ``layer``.

    Args:
        model: open_clip architecture name.
        pretrained: a pretrained tag or local checkpoint file; None: random weights.
        layer: the block whose output is taken, counted from the end (-2: penultimate).
        overrides: keyword arguments of ``open_clip.create_model`` (``{"vision_cfg": {"layers": 2}}``).
        image_size: input side in pixels (None: the architecture's; another size interpolates the position
            embedding, as open_clip does when loading).
    """

    def __init__(self, model: str, pretrained: str | None, layer: int, overrides: dict,
                 image_size: int | None = None):
        super().__init__()
        import open_clip

        kwargs = dict(overrides)
        if image_size is not None:
            kwargs["force_image_size"] = image_size
        clip = open_clip.create_model(model, pretrained=pretrained, **kwargs)
        preprocess = open_clip.get_model_preprocess_cfg(clip)
        self.visual = clip.visual
        self.visual.prune_intermediate_layers([layer], prune_head=True)  # blocks after `layer` never run
        self.visual.ln_post = torch.nn.Identity()  # the block output is taken before it: no unused weights
        self.image_size = tuple(preprocess["size"])
        self.mean, self.std = tuple(preprocess["mean"]), tuple(preprocess["std"])
        self.dim = self.visual.transformer.width
        self.grid = tuple(int(g) for g in self.visual.grid_size)
        self.heads = self.visual.transformer.resblocks[0].attn.num_heads

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` -> ``(T, S, D)``, the last kept block's output (open_clip's ``forward_intermediates``)."""
        return self.visual.forward_intermediates(pixels, indices=[-1], stop_early=True, output_fmt="NLC",
                                                 intermediates_only=True)["image_intermediates"][0]


class HFCLIPTower(VisionTower):
    """``transformers.CLIPVisionModel`` (``openai/clip-vit-large-patch14``), pruned after block ``layer``.

    Args:
        model: a hub name or local folder; with ``pretrained=None`` only its config is read (random weights).
        pretrained: None for random weights; any other value loads the weights at ``model``.
        layer, image_size: as :class:`OpenCLIPTower`.
    """

    def __init__(self, model: str, pretrained: str | None, layer: int, overrides: dict,
                 image_size: int | None = None):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        config = CLIPVisionConfig.from_pretrained(model, **overrides)
        if pretrained is None:
            self.clip = CLIPVisionModel(config)
        else:
            self.clip = CLIPVisionModel.from_pretrained(model, **overrides)
        vision = self.clip.config
        vision_model = getattr(self.clip, "vision_model", self.clip)  # transformers 4 nests it, 5 does not
        encoder = vision_model.encoder
        encoder.layers = encoder.layers[: len(encoder.layers) + 1 + layer]  # `layer` is the last block kept
        vision_model.post_layernorm = torch.nn.Identity()  # only the pooled CLS reads it: no unused weights
        try:
            processor = CLIPImageProcessor.from_pretrained(model)
            self.image_size = (processor.crop_size["height"], processor.crop_size["width"])
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        except OSError:  # a folder without preprocessor_config.json: CLIP's defaults at the tower's size
            self.image_size = (vision.image_size, vision.image_size)
            self.mean, self.std = CLIP_MEAN, CLIP_STD
        self._interpolate = image_size is not None and image_size != vision.image_size
        if self._interpolate:
            self.image_size = (image_size, image_size)
        self.dim, self.heads = vision.hidden_size, vision.num_attention_heads
        side = self.image_size[0] // vision.patch_size
        self.grid = (side, side)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` -> ``(T, S, D)``: the last kept block's output without CLS."""
        return self.clip(pixels, interpolate_pos_encoding=self._interpolate).last_hidden_state[:, 1:]
