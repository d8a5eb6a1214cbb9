"""Export a trained stage's model folder for serving, its LoRA adapters merged into the LLM: ``hf``, the whole
video-LLM as a Hugging Face folder our registered classes load (``import pipeline.model.hf``, then
``AutoModelForCausalLM.from_pretrained``); ``llava_next_video``, a ``LlavaNextVideoForConditionalGeneration``
folder plain transformers loads, for stages whose architecture is LLaVA-NeXT-Video's. A stage without that
counterpart ends with exit code 2 and one line naming the part.

``llava_next_video`` maps an online stage with a transformers CLIP tower (``hf_clip``), per-frame patch tokens and
the ``mlp2x_gelu`` connector: the tower pruned after the stage's block (``vision_feature_layer`` -1, CLS dropped:
``default``), the connector as ``multi_modal_projector.linear_1``/``linear_2`` (GELU), the LLM as
``language_model`` with ``<image>`` and ``<video>`` added to the tokenizer (new embedding and output rows the mean of
the others, so that greedy decoding never picks them). Our online vision does not pool patches, so the folder says
``spatial_pool_stride`` 1 (LLaVA-NeXT-Video's own checkpoints pool 2 x 2, which an online stage cannot express):
a frame takes S tokens, S the tower's patches. No processor is written: transformers' ``LlavaNextVideoProcessor``
assumes 2 x 2 pooling when it expands ``<video>`` (S / 4 tokens a frame), so a caller repeats ``<video>`` T x S
times itself (vLLM counts from ``spatial_pool_stride``). Images take our path for a picture, a one-frame video; the
folder's ``image_newline`` (LLaVA-NeXT's image path) is zeros.

Refused for ``llava_next_video`` (no counterpart): cached vision (the features rule's pooled rows, such as
Video-ChatGPT's T + S tokens), other towers (open_clip, the SSv2 fork's multi-channel CLIP, UMT, EVA), other
connectors (``linear``, ToMe, the Q-Former connectors), a tower run at another resolution than its own (position
embeddings interpolated), added tokens (``extra_embeddings``) and E.T. Chat's matching head.
"""

from __future__ import annotations

import argparse
import copy
import logging
import shutil
from pathlib import Path

from pipeline import PipelineError
from pipeline.cli import parser as cli_parser
from pipeline.cli import run

log = logging.getLogger(__name__)

FORMATS = ("hf", "llava_next_video")
DTYPES = ("float32", "bfloat16", "float16")
NO_COUNTERPART = 2
"""Exit code of an export the stage's architecture has no counterpart for."""
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"


class NoCounterpart(Exception):
    """The stage has a part the export format cannot express; the message names it (one line)."""


def llava_next_video_blocker(meta: dict) -> str | None:
    """The part of a stage (its :func:`pipeline.model.checkpoint.read_stage_config`) that LLaVA-NeXT-Video has no
    counterpart for, as one line; None when the stage maps exactly."""
    tower = meta.get("vision_tower") or {}
    if meta.get("vision") != "online":
        return ("vision: cached: the stage reads the features rule's cached rows (pooled there, such as "
                "Video-ChatGPT's T + S tokens), LlavaNextVideo runs its CLIP tower on frames")
    if tower.get("backend") != "hf_clip":
        return (f"vision tower {tower.get('backend')}: LlavaNextVideo's tower is a transformers CLIPVisionModel "
                "(backend hf_clip)")
    if meta["mm_projector_type"] != "mlp2x_gelu":
        return (f"connector {meta['mm_projector_type']}: LlavaNextVideo's projector is mlp2x_gelu (Linear, GELU, "
                "Linear, one token a patch)")
    if meta.get("matching"):
        return "matching head (E.T. Chat's <vid> timestamp matching): LlavaNextVideo has none"
    if meta.get("base_vocab") is not None:
        return ("added tokens (extra_embeddings, such as <vid_start>/<vid_end>): LlavaNextVideo's only embedding "
                "table is the LLM's")
    if meta.get("resolution") is not None:
        from transformers import CLIPVisionConfig

        native = CLIPVisionConfig.from_pretrained(tower["model"], **(tower.get("overrides") or {})).image_size
        if meta["resolution"] != native:
            return (f"resolution {meta['resolution']}: the tower interpolates its {native} px position embeddings, "
                    "LlavaNextVideo's CLIP does not")
    return None


def _padded(weight, rows: int):
    """``(V, h)`` -> ``(rows, h)``: new rows the mean of the old."""
    import torch

    if rows == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.mean(0, keepdim=True).expand(rows - weight.shape[0], -1)])


def save_llava_next_video(model, meta: dict, folder: Path, stage_folder: Path, dtype, max_shard_size: str) -> None:
    """Write a loaded stage (``model``, ``meta`` from :func:`pipeline.model.checkpoint.load_stage`; one
    :func:`llava_next_video_blocker` accepts) as a ``LlavaNextVideoForConditionalGeneration`` folder with the
    stage's tokenizer plus ``<image>`` and ``<video>``, weights in ``dtype``.

    Raises:
        ValueError: a part of the built model got no weights (a transformers version with other module names).
    """
    import torch
    from torch import nn
    from transformers import AutoTokenizer, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    from pipeline.io import follow_umask

    llm, tower = model.llm, model.vision_tower
    clip = tower.clip
    vision_model = getattr(clip, "vision_model", clip)
    vision_config = copy.deepcopy(clip.config)
    vision_config.num_hidden_layers = len(vision_model.encoder.layers)  # pruned after the stage's block
    tokenizer = AutoTokenizer.from_pretrained(stage_folder)
    tokenizer.add_tokens([t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in tokenizer.get_vocab()],
                         special_tokens=True)
    embed, head = llm.get_input_embeddings().weight.detach(), llm.get_output_embeddings().weight.detach()
    tied = embed.data_ptr() == head.data_ptr()
    vocab = max(embed.shape[0], len(tokenizer))
    text_config = copy.deepcopy(llm.config)
    text_config.vocab_size = vocab
    patches = tower.num_patches  # a frame's tokens: no pooling
    config = LlavaNextVideoConfig(
        vision_config=vision_config.to_dict(), text_config=text_config.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN), projector_hidden_act="gelu",
        multimodal_projector_bias=True, vision_feature_select_strategy="default", vision_feature_layer=-1,
        spatial_pool_mode="average", spatial_pool_stride=1, image_seq_length=patches, video_seq_length=patches,
        image_grid_pinpoints=[[vision_config.image_size, vision_config.image_size]], tie_word_embeddings=tied)
    config.dtype = dtype
    with torch.device("meta"):
        exported = LlavaNextVideoForConditionalGeneration(config)
    inner = exported.model
    base = llm.get_decoder()
    decoder = {key: value.to(dtype) for key, value in base.state_dict().items()}
    embed_name = next(name for name, module in base.named_modules() if module is base.get_input_embeddings())
    decoder[f"{embed_name}.weight"] = _padded(embed, vocab).to(dtype)
    inner.language_model.load_state_dict(decoder, assign=True)
    exported.lm_head.weight = (inner.language_model.get_input_embeddings().weight if tied
                               else nn.Parameter(_padded(head, vocab).to(dtype)))
    vision = {key: value.to(dtype) for key, value in clip.state_dict().items()}
    norm = getattr(inner.vision_tower, "vision_model", inner.vision_tower).post_layernorm  # unused: identity values
    prefix = "vision_model." if hasattr(inner.vision_tower, "vision_model") else ""
    vision[f"{prefix}post_layernorm.weight"] = torch.ones(norm.normalized_shape, dtype=dtype)
    vision[f"{prefix}post_layernorm.bias"] = torch.zeros(norm.normalized_shape, dtype=dtype)
    inner.vision_tower.load_state_dict(vision, assign=True)
    projector = model.mm_projector
    inner.multi_modal_projector.load_state_dict(
        {f"linear_{i}.{name}": getattr(projector[j], name).detach().to(dtype)
         for i, j in ((1, 0), (2, 2)) for name in ("weight", "bias")}, assign=True)
    inner.image_newline = nn.Parameter(torch.zeros(text_config.hidden_size, dtype=dtype))
    empty = [name for name, param in exported.named_parameters() if param.is_meta]
    if empty:
        raise ValueError(f"LlavaNextVideoForConditionalGeneration: no weights for {empty[:5]}")
    exported.generation_config = copy.deepcopy(llm.generation_config)
    exported.save_pretrained(folder, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(folder)
    follow_umask(folder)


def export(stage: str | Path, out: str | Path, fmt: str = "hf", dtype: str = "float32",
           max_shard_size: str = "5GB") -> None:
    """Write the stage folder ``stage`` as ``fmt`` (one of :data:`FORMATS`) to the folder ``out`` (atomically:
    written beside it, then moved in), weights in ``dtype`` (one of :data:`DTYPES`).

    Raises:
        PipelineError: ``stage`` is not a stage folder.
        NoCounterpart: ``fmt`` cannot express a part of the stage (:func:`llava_next_video_blocker`).
    """
    import torch

    from pipeline.io import publish_dir
    from pipeline.model.checkpoint import is_stage_folder, load_stage, read_stage_config
    from pipeline.model.hf import save_hf

    stage, out = Path(stage), Path(out)
    if not is_stage_folder(stage):
        raise PipelineError(f"{stage}: not a stage folder (no config.json of model_type video_llm)")
    if fmt == "llava_next_video":
        blocker = llava_next_video_blocker(read_stage_config(stage))
        if blocker:
            raise NoCounterpart(f"{stage}: no LLaVA-NeXT-Video counterpart for {blocker}")
    model, meta = load_stage(stage, torch.float32)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    weights = getattr(torch, dtype)
    if fmt == "hf":
        save_hf(model, meta, tmp, stage, weights, max_shard_size)
    else:
        save_llava_next_video(model, meta, tmp, stage, weights, max_shard_size)
    publish_dir(tmp, out)
    log.info("%s -> %s (%s, %s)", stage, out, fmt, dtype)


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.export --stage DIR --out DIR [--format hf|llava_next_video] [--dtype ...]``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--stage", required=True, help="a stage's model folder: results/train/<stage>/model")
    parser.add_argument("--out", required=True, help="the folder to write (replaced when it exists)")
    parser.add_argument("--format", choices=FORMATS, default="hf")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="of every exported weight")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (transformers' size)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Export the stage (:func:`export`); exit code :data:`NO_COUNTERPART` with one line when the format cannot
    express it."""
    args = parser().parse_args(argv)
    try:
        export(args.stage, args.out, args.format, args.dtype, args.max_shard_size)
    except NoCounterpart as error:
        log.error("%s", error)
        return NO_COUNTERPART
    return 0


if __name__ == "__main__":
    run(main)
