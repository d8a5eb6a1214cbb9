"""The video-LLM: any Hugging Face causal LM plus an ``mm_projector`` that feeds it video feature rows.

The positions of ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the projected feature rows in order (LLaVA's
``prepare_inputs_labels_for_multimodal``, without re-deriving labels: the dataset already masks those positions).

A stage's model folder holds ``mm_projector.safetensors``, ``video_llm.json`` (what to load: the LLM, the LoRA
adapters merged into it in order, the projector's shape), and ``adapter/`` (a PEFT LoRA adapter) or ``llm/`` (a
full LLM with its tokenizer) when the stage trained them.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from pipeline import VIDEO_TOKEN_INDEX
from pipeline.io import read_json, write_json
from pipeline.model.projector import build_projector

log = logging.getLogger(__name__)

META = "video_llm.json"
PROJECTOR_FILE = "mm_projector.safetensors"


def attention_implementation() -> str:
    """``flash_attention_2`` when the flash-attn package is installed and CUDA is available, else ``sdpa``."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class VideoLLM(nn.Module):
    """A causal LM with an ``mm_projector``.

    Args:
        llm: a ``transformers`` causal LM (or a PEFT model wrapping one).
        mm_projector: maps ``(N, D_vision)`` feature rows to ``(N, hidden_size)``.
    """

    def __init__(self, llm: nn.Module, mm_projector: nn.Module):
        super().__init__()
        self.llm = llm
        self.mm_projector = mm_projector

    @property
    def config(self):
        """The LLM's config (the HF Trainer reads it)."""
        return self.llm.config

    def embed(self, input_ids: torch.Tensor, video_features: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings with the projected video rows at the ``VIDEO_TOKEN_INDEX`` positions.

        Args:
            input_ids: ``(B, L)`` int64.
            video_features: ``(M, D_vision)``, M = the number of ``VIDEO_TOKEN_INDEX`` positions in the batch.

        Returns:
            ``(B, L, hidden_size)`` in the embedding dtype.

        Raises:
            ValueError: the number of video positions differs from the number of feature rows.
        """
        is_video = input_ids == VIDEO_TOKEN_INDEX
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(is_video, 0))
        count = int(is_video.sum())
        rows = 0 if video_features is None else video_features.shape[0]
        if count != rows:
            raise ValueError(f"{count} video positions in input_ids but {rows} video feature rows")
        if rows:
            weight = next(self.mm_projector.parameters())
            projected = self.mm_projector(video_features.to(weight.dtype)).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_video.unsqueeze(-1), projected)
        return embeds

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, video_features: torch.Tensor | None = None, **kwargs):
        """The LLM's forward pass on the spliced embeddings; with ``labels``, its output carries the loss."""
        embeds = self.embed(input_ids, video_features)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, video_features: torch.Tensor,
                 **kwargs) -> torch.Tensor:
        """Generate from left-padded prompts; returns only the new tokens ``(B, new)``."""
        embeds = self.embed(input_ids, video_features)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the LLM's layers (the HF Trainer calls this when ``gradient_checkpointing`` is set)."""
        self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def load_llm(name_or_path: str, dtype: torch.dtype, adapters: list[str] = ()) -> nn.Module:
    """Load a causal LM by hub name or local folder and merge the given LoRA adapter folders into it, in order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    attn = attention_implementation()
    log.info("loading %s (%s, attention %s)", name_or_path, dtype, attn)
    llm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn)
    for adapter in adapters:
        log.info("merging LoRA adapter %s", adapter)
        llm = PeftModel.from_pretrained(llm, adapter).merge_and_unload()
    return llm


def load_stage(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VideoLLM, dict]:
    """Load a stage's model folder: the LLM with every adapter merged, and the trained ``mm_projector``.

    Returns:
        The model (eval mode) and the folder's ``video_llm.json``.
    """
    model_dir = Path(model_dir)
    meta = read_json(model_dir / META)
    llm = load_llm(meta["llm"], dtype, meta["adapters"])
    projector = build_projector(meta["mm_projector_type"], meta["mm_hidden_size"], meta["hidden_size"])
    projector.load_state_dict(safetensors.torch.load_file(model_dir / PROJECTOR_FILE))
    return VideoLLM(llm, projector.to(dtype)).eval(), meta


def save_stage(model: VideoLLM, out_dir: str | Path, meta: dict, tokenizer=None) -> None:
    """Write a stage's model folder (see the module docstring) from ``model`` as trained.

    Args:
        meta: the ``video_llm.json`` content; its ``llm_training`` (``frozen``, ``lora`` or ``full``) decides
            whether ``adapter/`` or ``llm/`` (with ``tokenizer``) is written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.mm_projector.state_dict().items()}
    safetensors.torch.save_file(state, out_dir / PROJECTOR_FILE)
    if meta["llm_training"] == "lora":
        model.llm.save_pretrained(out_dir / "adapter")
    elif meta["llm_training"] == "full":
        model.llm.save_pretrained(out_dir / "llm")
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir / "llm")
    write_json(out_dir / META, meta)
