"""The video-LLM: any Hugging Face causal LM plus an ``mm_projector`` that feeds it video feature rows.

The positions of ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the projected feature rows in order (LLaVA's
``prepare_inputs_labels_for_multimodal``, without re-deriving labels: the dataset already masks those positions).
Tokens a recipe adds to the vocabulary (Video-ChatGPT's ``<vid_start>``/``<vid_end>``) get their own small
embedding table, ``extra_embeddings``, so that training them never touches the LLM's embedding matrix.

A stage's model folder holds ``mm_projector.safetensors``, ``video_llm.json`` (what to load: the LLM, the LoRA
adapters merged into it in order, the projector's shape, the tokenizer), ``adapter/`` (a PEFT LoRA adapter) or
``llm/`` (a full LLM with its tokenizer) when the stage trained them, and ``extra_embeddings.safetensors`` with
``tokenizer/`` when the vocabulary grew.
"""

from __future__ import annotations

import contextlib
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
EXTRA_FILE = "extra_embeddings.safetensors"


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
        extra_embeddings: embeddings of the tokens added to the vocabulary, ids ``base_vocab`` and up.
        base_vocab: the tokenizer's size before tokens were added.
    """

    def __init__(self, llm: nn.Module, mm_projector: nn.Module, extra_embeddings: nn.Embedding | None = None,
                 base_vocab: int | None = None):
        super().__init__()
        self.llm = llm
        self.mm_projector = mm_projector
        self.extra_embeddings = extra_embeddings
        self.base_vocab = base_vocab

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
        is_extra = input_ids >= self.base_vocab if self.extra_embeddings is not None else None
        base_ids = input_ids.masked_fill(is_video, 0)
        if is_extra is not None:
            base_ids = base_ids.masked_fill(is_extra, 0)
        embeds = self.llm.get_input_embeddings()(base_ids)
        if is_extra is not None and is_extra.any():
            extra = self.extra_embeddings(input_ids[is_extra] - self.base_vocab).to(embeds.dtype)
            embeds = embeds.masked_scatter(is_extra.unsqueeze(-1), extra)
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

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the LLM's layers (the HF Trainer calls this when ``gradient_checkpointing`` is set; ``kwargs``
        such as ``every_n_layers`` go to the LLM's own method); the inputs require grad so that a frozen embedding
        does not cut the graph to the projector."""
        self.llm.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)
        self.llm.enable_input_require_grads()


def gathered(*params: nn.Parameter):
    """Context in which parameters partitioned by DeepSpeed ZeRO-3 hold their full values (no-op otherwise)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params))
    return contextlib.nullcontext()


@contextlib.contextmanager
def _unpartitioned_loading():
    """Load weights whole even when a ZeRO-3 config is active: merging LoRA adapters needs the full matrices.
    The DeepSpeed engine partitions the merged model when training starts."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


LLAVA_V1_ARCHITECTURES = {"LlavaLlamaForCausalLM", "VideoChatGPTLlamaForCausalLM"}


def _llava_v1_config(name_or_path: str):
    """A ``LlamaConfig`` for an original LLaVA-v1 checkpoint (``model_type: llava``, architecture
    ``LlavaLlamaForCausalLM``: a Llama whose weights also hold ``model.mm_projector``), which the Auto classes map
    to another model; None for any other checkpoint."""
    from transformers import LlamaConfig, PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(name_or_path)
    if set(config.get("architectures") or ()) & LLAVA_V1_ARCHITECTURES:
        log.info("%s: a LLaVA-v1 checkpoint, loaded as its Llama (the mm_projector weights are read apart)",
                 name_or_path)
        return LlamaConfig.from_dict({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    return None


def load_llm(name_or_path: str, dtype: torch.dtype, adapters: list[str] = ()) -> nn.Module:
    """Load a causal LM by hub name or local folder and merge the given LoRA adapter folders into it, in order.

    Original LLaVA-v1 checkpoints (LLaVA-Lightning-7B, Video-ChatGPT's start) load as the Llama they contain.
    Under an active ZeRO-3 config (``TrainingArguments`` made first) the weights load partitioned across ranks,
    except when adapters must be merged: then each rank loads them whole, merges, and DeepSpeed partitions later.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    attn = attention_implementation()
    log.info("loading %s (%s, attention %s)", name_or_path, dtype, attn)
    llava_v1 = _llava_v1_config(name_or_path)
    with _unpartitioned_loading() if adapters else contextlib.nullcontext():
        llm = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation=attn,
                                                   **({"config": llava_v1} if llava_v1 else {}))
        for adapter in adapters:
            log.info("merging LoRA adapter %s", adapter)
            llm = PeftModel.from_pretrained(llm, adapter).merge_and_unload()
    return llm


def load_stage(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[VideoLLM, dict]:
    """Load a stage's model folder: the LLM with every adapter merged, the trained ``mm_projector`` and any
    embeddings of added tokens.

    Returns:
        The model (eval mode) and the folder's ``video_llm.json``.
    """
    model_dir = Path(model_dir)
    meta = read_json(model_dir / META)
    llm = load_llm(meta["llm"], dtype, meta["adapters"])
    projector = build_projector(meta["mm_projector_type"], meta["mm_hidden_size"], meta["hidden_size"])
    projector.load_state_dict(safetensors.torch.load_file(model_dir / PROJECTOR_FILE))
    extra = None
    if meta.get("extra_embeddings"):
        weight = safetensors.torch.load_file(Path(meta["extra_embeddings"]))["weight"]
        extra = nn.Embedding.from_pretrained(weight.to(dtype), freeze=False)
    return VideoLLM(llm, projector.to(dtype), extra, meta.get("base_vocab")).eval(), meta


def save_stage(model: VideoLLM, out_dir: str | Path, meta: dict, tokenizer=None,
               state_dict: dict | None = None) -> None:
    """Write a stage's model folder (see the module docstring) from ``model`` as trained.

    Args:
        meta: the ``video_llm.json`` content; its ``llm_training`` (``frozen``, ``lora`` or ``full``) decides
            whether ``adapter/`` or ``llm/`` (with ``tokenizer``) is written, ``extra_embeddings`` whether the
            added tokens' embeddings and the tokenizer are.
        state_dict: the model's weights when the module's own are not whole (DeepSpeed ZeRO-3 partitions them: the
            Trainer gathers them in 16 bit); default ``model.state_dict()``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v.detach().float().cpu().contiguous() for k, v in state.items()
                if k.startswith(prefix)}

    safetensors.torch.save_file(part("mm_projector."), out_dir / PROJECTOR_FILE)
    llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    if meta["llm_training"] == "lora":
        model.llm.save_pretrained(out_dir / "adapter", state_dict=llm_state)
    elif meta["llm_training"] == "full":
        model.llm.save_pretrained(out_dir / "llm", state_dict=llm_state)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir / "llm")
    if meta.get("extra_embeddings"):
        safetensors.torch.save_file(part("extra_embeddings."), out_dir / EXTRA_FILE)
        tokenizer.save_pretrained(out_dir / "tokenizer")
    write_json(out_dir / META, meta)
