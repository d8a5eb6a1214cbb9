"""A stage folder on disk: everything one trained stage needs to load, with paths relative to the folder.

A stage's ``model/`` folder holds

- ``config.json``: the one metadata file, ``model_type`` ``video_llm`` (:data:`MODEL_TYPE`), with
  ``base_llm`` (the LLM the first stage started from, a hub name or an absolute folder: a 7B base is not copied
  into every stage), ``llm`` (``"llm"`` when the folder holds the whole LLM, else null), ``adapters`` (the LoRA
  adapters merged into the LLM in order, relative to the folder), ``mm_projector_type``, ``mm_hidden_size``,
  ``hidden_size``, ``base_vocab`` (the tokenizer's size before added tokens; null when none were added),
  ``vision_tower`` (the tower's settings: backend, model, pretrained, seed, layer, overrides, resize),
  ``vision_tower_weights`` (``"vision_tower.safetensors"`` once a stage has trained the tower, else null: the
  tower is its ``pretrained`` weights), and the stage's ``stage``, ``llm_training``, ``template``,
  ``video_start_end``, ``max_frames``, ``vision`` (cached or online), ``frames``, ``resolution`` and
  ``video_prompt``, ``connector`` (the connector's own settings) and ``matching`` (``alpha``,
  ``bidirectional_frames``, ``token_id`` of ``<vid>``; null without);
- the tokenizer's files (``tokenizer.json``, ``tokenizer_config.json``, ...), so that
  ``AutoTokenizer.from_pretrained(folder)`` gives the stage's tokenizer, added tokens included;
- ``mm_projector.safetensors`` and, when tokens were added, ``extra_embeddings.safetensors`` (float32);
  ``matching.safetensors`` (float32) with matching; ``qformer_tokenizer/`` for a question-conditioned connector
  (E.T. Chat's Q-Former reads the question in BERT's vocabulary);
- ``vision_tower.safetensors`` (float32) when this stage or an earlier one trained the tower: written by the stage
  that trained it, hard-linked into every later stage's folder, and what the next stage's tower starts from;
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
from pipeline.model.connectors import build_connector
from pipeline.model.matching import MatchingHead
from pipeline.model.video_llm import VideoLLM, load_llm

CONFIG = "config.json"
MODEL_TYPE = "video_llm"
PROJECTOR_FILE = "mm_projector.safetensors"
EXTRA_FILE = "extra_embeddings.safetensors"
ADAPTERS = "adapters"
ADAPTER_FILE = "adapter_model.safetensors"
LLM_DIR = "llm"
TOWER_FILE = "vision_tower.safetensors"
MATCH_FILE = "matching.safetensors"
QUERY_TOKENIZER_DIR = "qformer_tokenizer"


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
    weights = meta.get("vision_tower_weights")
    return {**meta, "llm": str(folder / meta["llm"]) if meta["llm"] else None,
            "adapters": [str(folder / adapter) for adapter in meta["adapters"]],
            "vision_tower_weights": str(folder / weights) if weights else None}


def build_stage_tower(meta: dict, dtype: torch.dtype = torch.float32):
    """The vision tower of a stage's metadata: its settings, the trained weights when a stage trained it, at the
    stage's ``resolution``.

    Raises:
        ValueError: the weights file does not fit the tower.
    """
    from pipeline.vision import build_tower

    settings = meta["vision_tower"]
    tower = build_tower(settings["backend"], settings["model"], settings.get("pretrained"), settings["layer"],
                        settings.get("overrides") or {}, settings.get("seed", 0), meta.get("resolution"))
    if meta.get("vision_tower_weights"):
        missing, unexpected = tower.load_state_dict(safetensors.torch.load_file(meta["vision_tower_weights"]),
                                                    strict=False)
        if missing or unexpected:
            raise ValueError(f"{meta['vision_tower_weights']}: does not fit the tower {settings['backend']} "
                             f"{settings['model']} (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return tower.to(dtype)


def stage_query_tokenizer(connector: nn.Module, settings: dict, folder: str | os.PathLike | None = None):
    """The question tokenizer of a question-conditioned connector (``needs_query``): the stage folder's
    ``qformer_tokenizer/`` when ``folder`` is a stage folder that has one, else ``settings["tokenizer"]``
    (default ``bert-base-uncased``, E.T. Chat ``etchat_arch.py:39``); None for other connectors."""
    if not getattr(connector, "needs_query", False):
        return None
    from pipeline.model.qformer import qformer_tokenizer

    saved = Path(folder) / QUERY_TOKENIZER_DIR if folder is not None else None
    if saved is not None and is_stage_folder(folder) and saved.is_dir():
        return qformer_tokenizer(str(saved))
    return qformer_tokenizer(settings.get("tokenizer", "bert-base-uncased"))


def _matching(meta: dict, dtype: torch.dtype, folder: Path | None = None) -> MatchingHead | None:
    """The stage's matching head (its weights from ``folder``), or None."""
    if not meta.get("matching"):
        return None
    settings = meta["matching"]
    head = MatchingHead(meta["hidden_size"], settings["token_id"], settings["alpha"], settings["bidirectional_frames"])
    if folder is not None:
        head.load_state_dict(safetensors.torch.load_file(folder / MATCH_FILE))
    return head.to(dtype)


def own_adapter(meta: dict) -> str:
    """Where the adapter a LoRA stage trains goes, relative to its folder: after the adapters it inherits."""
    return f"{ADAPTERS}/{len(meta['adapters'])}_{meta['stage']}"


def llm_source(meta: dict) -> str:
    """What a stage's LLM loads from before its adapters are merged: its whole ``llm/`` (or, while the stage
    trains, an earlier stage's), else the base LLM. It is also the ``base_model_name_or_path`` of the adapter a
    LoRA stage trains (the earlier adapters merged under it are listed in ``config.json`` only)."""
    return meta["llm"] or meta["base_llm"]


def load_stage(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
               mm_dtype: torch.dtype | None = None, tower: bool = True) -> tuple[VideoLLM, dict]:
    """Load a stage folder: the LLM with every adapter merged, the ``mm_projector`` and the added tokens'
    embeddings, from any working directory.

    Args:
        dtype: the LLM's weights.
        mm_dtype: the ``mm_projector``'s, ``extra_embeddings``' and vision tower's weights (default ``dtype``); a
            bfloat16 stage that trains them keeps them float32.
        tower: build the vision tower of an online stage (:func:`build_stage_tower`); False leaves it None (a
            stage starting from this one builds its own, at its own resolution).

    Returns:
        The model (eval mode) and :func:`read_stage_config`.

    Raises:
        ValueError: ``folder`` is not a stage folder.
    """
    folder = Path(folder)
    meta = read_stage_config(folder)
    mm_dtype = mm_dtype or dtype
    llm = load_llm(llm_source(meta), dtype, meta["adapters"])
    settings = dict(meta.get("connector") or {})
    if "tokenizer" in settings and (folder / QUERY_TOKENIZER_DIR).is_dir():  # the copy in the folder, not the source
        settings["tokenizer"] = str(folder / QUERY_TOKENIZER_DIR)
    projector = build_connector(meta["mm_projector_type"], meta["mm_hidden_size"], meta["hidden_size"],
                                settings)
    projector.load_state_dict(safetensors.torch.load_file(folder / PROJECTOR_FILE))
    extra = None
    if meta["base_vocab"] is not None:
        weight = safetensors.torch.load_file(folder / EXTRA_FILE)["weight"]
        extra = nn.Embedding.from_pretrained(weight.to(mm_dtype), freeze=False)
    vision = build_stage_tower(meta, mm_dtype) if tower and meta.get("vision") == "online" else None
    return VideoLLM(llm, projector.to(mm_dtype), extra, meta["base_vocab"], vision,
                    _matching(meta, mm_dtype, folder)).eval(), meta


def save_trained(model: VideoLLM, folder: str | os.PathLike, meta: dict, state_dict: dict | None = None) -> None:
    """Write the weights a stage trains: ``mm_projector.safetensors``, ``extra_embeddings.safetensors`` (when
    tokens were added), ``vision_tower.safetensors`` (``vision_tower_training`` full), the stage's LoRA adapter
    (``llm_training`` lora) or ``llm/`` (full), float32 (a full LLM in its own dtype). This is all a training
    checkpoint needs besides the optimizer's state (:func:`load_trained`); :func:`write_stage_folder` completes a
    stage folder.

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
    if meta.get("matching"):
        safetensors.torch.save_file(part("matching."), folder / MATCH_FILE)
    if meta.get("vision_tower_training") in ("full", "lora"):  # lora: the adapters' and the base weights
        safetensors.torch.save_file(part("vision_tower."), folder / TOWER_FILE)
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
    if meta.get("matching"):
        model.matching.load_state_dict(safetensors.torch.load_file(folder / MATCH_FILE))
    if meta.get("vision_tower_training") in ("full", "lora"):
        model.vision_tower.load_state_dict(safetensors.torch.load_file(folder / TOWER_FILE))
    if meta["llm_training"] == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.llm, safetensors.torch.load_file(folder / own_adapter(meta) / ADAPTER_FILE))
    elif meta["llm_training"] == "full":
        for shard in sorted((folder / LLM_DIR).glob("*.safetensors")):  # tied weights are saved once
            model.llm.load_state_dict(safetensors.torch.load_file(shard), strict=False)


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A state dict with peft's LoRA adapters (``X.base_layer.weight``, ``X.lora_A.default.weight``,
    ``X.lora_B.default.weight``) merged: ``X.weight = W + scale * B @ A`` (``scale`` = alpha / r), as peft's
    ``merge_and_unload``; ``X.base_layer.bias`` becomes ``X.bias``, every other key is kept. Shapes ``(out, in)``
    float32."""
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix, name = key.split(".base_layer.")
            if name == "weight":
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = value + scale * (b.float() @ a.float()).to(value.dtype)
            key = f"{prefix}.{name}"
        merged[key] = value
    return merged


def _link_file(src: str | Path, dst: str | Path) -> None:
    """``dst`` as a hard link to ``src`` (no space used), or a copy where the two are on different file systems."""
    try:
        os.link(src, dst)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)


def _link_tree(source: Path, dest: Path) -> None:
    """``dest`` as a copy of the folder ``source`` made of hard links (:func:`_link_file`)."""
    shutil.copytree(source, dest, copy_function=_link_file)


def write_stage_folder(folder: str | os.PathLike, meta: dict, tokenizer, query_tokenizer=None) -> None:
    """Complete a stage folder in which :func:`save_trained` wrote the trained weights: copy in the adapters the
    stage inherits, link in the whole LLM it inherits, save the tokenizer at the top level and write
    ``config.json`` with paths relative to the folder.

    Args:
        meta: the stage's metadata in memory (absolute ``llm`` and ``adapters`` to copy from).
        tokenizer: the stage's tokenizer, added tokens included.
        query_tokenizer: a question-conditioned connector's tokenizer, saved in ``qformer_tokenizer/``.
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
    if query_tokenizer is not None:
        query_tokenizer.save_pretrained(folder / QUERY_TOKENIZER_DIR)
    has_llm = meta["llm_training"] == "full" or bool(meta["llm"])
    trained_tower = meta.get("vision_tower_training") in ("full", "lora")
    if meta.get("vision_tower_training") == "lora":  # the stage folder's tower is whole: adapters merged
        lora = meta["vision_lora"]
        state = merge_lora(safetensors.torch.load_file(folder / TOWER_FILE), lora["alpha"] / lora["r"])
        safetensors.torch.save_file(state, folder / TOWER_FILE)
    has_tower = trained_tower or bool(meta.get("vision_tower_weights"))
    write_json(folder / CONFIG, {"model_type": MODEL_TYPE, **meta, "llm": LLM_DIR if has_llm else None,
                                 "adapters": adapters, "vision_tower_weights": TOWER_FILE if has_tower else None})
    follow_umask(folder)
    if meta["llm"] and meta["llm_training"] != "full":  # linked files keep the modes their stage gave them
        _link_tree(Path(meta["llm"]), folder / LLM_DIR)
    if has_tower and not trained_tower:
        _link_file(Path(meta["vision_tower_weights"]), folder / TOWER_FILE)
