"""A stage folder on disk: everything one trained stage needs to load, with paths relative to the folder.

A stage's ``model/`` folder holds

- ``config.json``: the one metadata file, ``model_type`` ``video_llm`` (:data:`MODEL_TYPE`), with
  ``base_llm`` (the LLM the first stage started from, a hub name or an absolute folder: a 7B base is not copied
  into every stage), ``llm`` (``"llm"`` when the folder holds the whole LLM, else null), ``adapters`` (the LoRA
  adapters merged into the LLM in order, relative to the folder), ``mm_projector_type``, ``mm_hidden_size``,
  ``hidden_size``, ``base_vocab`` (the tokenizer's size before added tokens; null when none were added), and the
  stage's ``stage``, ``llm_training``, ``template``, ``video_start_end`` and ``max_frames``;
- the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``, ...), so that
  ``AutoTokenizer.from_pretrained(folder)`` gives the stage's tokenizer, added tokens included;
- ``mm_projector.safetensors`` and, when tokens were added, ``extra_embeddings.safetensors`` (float32);
- ``adapters/<i>_<stage>/`` (``adapter_config.json``, ``adapter_model.safetensors``): the LoRA adapter of every
  stage since the LLM was last written whole, copied in from the earlier stages' folders (they are small); an
  adapter's ``base_model_name_or_path`` is a hub name or an absolute folder, never a path relative to where a
  run was started;
- ``llm/`` (a Hugging Face causal-LM folder) when this stage or an earlier one trained the whole LLM: written by
  the stage that trained it, hard-linked (copied across file systems) into every later stage's folder.

The stage adds ``stage.yaml`` (its settings) and ``excluded.jsonl`` (the records it could not train on).

In memory (what :func:`read_stage_config` returns and the training stage builds), ``llm`` and ``adapters`` are
absolute paths: the folders to load or copy from. Every file is written with the user's umask (safetensors' own
``0o600`` is replaced). No pickle is read: weights are safetensors, metadata JSON.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from pipeline.io import follow_umask, read_json, write_json
from pipeline.model.projector import build_projector
from pipeline.model.video_llm import VideoLLM, load_llm

CONFIG = "config.json"
MODEL_TYPE = "video_llm"
PROJECTOR_FILE = "mm_projector.safetensors"
EXTRA_FILE = "extra_embeddings.safetensors"
ADAPTERS = "adapters"
ADAPTER_FILE = "adapter_model.safetensors"
LLM_DIR = "llm"


class VideoLLMConfig(PretrainedConfig):
    """A stage folder's ``config.json`` as a transformers config: registered with ``AutoConfig``, so that
    ``AutoConfig.from_pretrained(folder)`` reads it and ``AutoTokenizer.from_pretrained(folder)`` loads the
    stage's tokenizer without a warning about an unknown ``model_type`` once this module is imported (without it
    the tokenizer still loads)."""

    model_type = MODEL_TYPE


AutoConfig.register(MODEL_TYPE, VideoLLMConfig)


def is_stage_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a stage folder (a ``config.json`` of ``model_type`` ``video_llm``), not an LLM."""
    config = Path(path) / CONFIG
    return config.is_file() and read_json(config).get("model_type") == MODEL_TYPE


def read_stage_config(folder: str | os.PathLike) -> dict:
    """A stage folder's ``config.json`` with ``llm`` and ``adapters`` made absolute paths.

    Raises:
        ValueError: ``folder`` is not a stage folder.
    """
    folder = Path(folder).resolve()
    if not is_stage_folder(folder):
        raise ValueError(f"{folder}: not a stage folder (no {CONFIG} with model_type {MODEL_TYPE!r})")
    meta = read_json(folder / CONFIG)
    return {**meta, "llm": str(folder / meta["llm"]) if meta["llm"] else None,
            "adapters": [str(folder / adapter) for adapter in meta["adapters"]]}


def own_adapter(meta: dict) -> str:
    """Where the adapter a LoRA stage trains goes, relative to its folder: after the adapters it inherits."""
    return f"{ADAPTERS}/{len(meta['adapters'])}_{meta['stage']}"


def llm_source(meta: dict) -> str:
    """What a stage's LLM loads from before its adapters are merged: its whole ``llm/`` (or, while the stage
    trains, an earlier stage's), else the base LLM. It is also the ``base_model_name_or_path`` of the adapter a
    LoRA stage trains (the earlier adapters merged under it are listed in ``config.json`` only)."""
    return meta["llm"] or meta["base_llm"]


def load_stage(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
               mm_dtype: torch.dtype | None = None) -> tuple[VideoLLM, dict]:
    """Load a stage folder: the LLM with every adapter merged, the ``mm_projector`` and the added tokens'
    embeddings, from any working directory.

    Args:
        dtype: the LLM's weights.
        mm_dtype: the ``mm_projector``'s and ``extra_embeddings``' weights (default ``dtype``); a bfloat16 stage
            that trains them keeps them float32.

    Returns:
        The model (eval mode) and :func:`read_stage_config`.

    Raises:
        ValueError: ``folder`` is not a stage folder.
    """
    folder = Path(folder)
    meta = read_stage_config(folder)
    mm_dtype = mm_dtype or dtype
    llm = load_llm(llm_source(meta), dtype, meta["adapters"])
    projector = build_projector(meta["mm_projector_type"], meta["mm_hidden_size"], meta["hidden_size"])
    projector.load_state_dict(safetensors.torch.load_file(folder / PROJECTOR_FILE))
    extra = None
    if meta["base_vocab"] is not None:
        weight = safetensors.torch.load_file(folder / EXTRA_FILE)["weight"]
        extra = nn.Embedding.from_pretrained(weight.to(mm_dtype), freeze=False)
    return VideoLLM(llm, projector.to(mm_dtype), extra, meta["base_vocab"]).eval(), meta


def save_trained(model: VideoLLM, folder: str | os.PathLike, meta: dict, state_dict: dict | None = None) -> None:
    """Write the weights a stage trains: ``mm_projector.safetensors``, ``extra_embeddings.safetensors`` (when
    tokens were added), the stage's LoRA adapter (``llm_training`` lora) or ``llm/`` (full), float32 (a full LLM
    in its own dtype). This is all a training checkpoint needs besides the optimizer's state
    (:func:`load_trained`); :func:`write_stage_folder` completes a stage folder.

    Args:
        meta: the stage's metadata (:func:`read_stage_config`'s keys, in memory).
        state_dict: the model's weights when the module's own are not whole (DeepSpeed ZeRO-3 partitions them:
            the Trainer gathers them); default ``model.state_dict()``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v.detach().float().cpu().contiguous() for k, v in state.items()
                if k.startswith(prefix)}

    safetensors.torch.save_file(part("mm_projector."), folder / PROJECTOR_FILE)
    if meta["base_vocab"] is not None:
        safetensors.torch.save_file(part("extra_embeddings."), folder / EXTRA_FILE)
    llm_state = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    if meta["llm_training"] == "lora":
        model.llm.save_pretrained(folder / own_adapter(meta), state_dict=llm_state)
    elif meta["llm_training"] == "full":
        model.llm.save_pretrained(folder / LLM_DIR, state_dict=llm_state)
    follow_umask(folder)


def load_trained(model: VideoLLM, folder: str | os.PathLike, meta: dict) -> None:
    """Load what :func:`save_trained` wrote into ``model`` (resuming a stage from its checkpoint)."""
    folder = Path(folder)
    model.mm_projector.load_state_dict(safetensors.torch.load_file(folder / PROJECTOR_FILE))
    if meta["base_vocab"] is not None:
        model.extra_embeddings.load_state_dict(safetensors.torch.load_file(folder / EXTRA_FILE))
    if meta["llm_training"] == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.llm, safetensors.torch.load_file(folder / own_adapter(meta) / ADAPTER_FILE))
    elif meta["llm_training"] == "full":
        for shard in sorted((folder / LLM_DIR).glob("*.safetensors")):  # tied weights are saved once
            model.llm.load_state_dict(safetensors.torch.load_file(shard), strict=False)


def _link_tree(source: Path, dest: Path) -> None:
    """``dest`` as a copy of the folder ``source`` made of hard links (no space used), or of copies where the
    two are on different file systems."""
    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, copy_function=link)


def write_stage_folder(folder: str | os.PathLike, meta: dict, tokenizer) -> None:
    """Complete a stage folder in which :func:`save_trained` wrote the trained weights: copy in the adapters the
    stage inherits, link in the whole LLM it inherits, save the tokenizer at the top level and write
    ``config.json`` with paths relative to the folder.

    Args:
        meta: the stage's metadata in memory (absolute ``llm`` and ``adapters`` to copy from).
        tokenizer: the stage's tokenizer, added tokens included.
    """
    folder = Path(folder)
    adapters = []
    if meta["llm_training"] != "full":  # a full stage's llm/ has the earlier adapters merged
        for source in map(Path, meta["adapters"]):
            adapters.append(f"{ADAPTERS}/{source.name}")
            shutil.copytree(source, folder / adapters[-1])
        if meta["llm_training"] == "lora":
            adapters.append(own_adapter(meta))
    tokenizer.save_pretrained(folder)
    has_llm = meta["llm_training"] == "full" or bool(meta["llm"])
    write_json(folder / CONFIG, {"model_type": MODEL_TYPE, **meta, "llm": LLM_DIR if has_llm else None,
                                 "adapters": adapters})
    follow_umask(folder)
    if meta["llm"] and meta["llm_training"] != "full":  # linked files keep the modes their stage gave them
        _link_tree(Path(meta["llm"]), folder / LLM_DIR)
