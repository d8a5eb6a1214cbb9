"""A trained stage as one Hugging Face model folder: the whole video-LLM (LLM with its LoRA adapters merged,
``mm_projector``, added tokens' embeddings, vision tower, matching head) behind our own ``transformers`` classes.

Importing this module registers :class:`VideoLLMHFConfig` (``model_type`` :data:`HF_MODEL_TYPE`) with
``AutoConfig`` and :class:`VideoLLMForCausalLM` with ``AutoModel`` and ``AutoModelForCausalLM``, so that::

    import pipeline.model.hf
    model = AutoModelForCausalLM.from_pretrained(folder)

loads a folder :func:`save_hf` wrote, from this package's code (no ``trust_remote_code``). The folder holds
``config.json`` (the LLM's config as ``text_config``, the stage's metadata as ``stage``, the vision tower's own
config files as ``tower_files``), the weights as ``model.safetensors`` (sharded when large; tied weights once),
under the same parameter names as :class:`~pipeline.model.video_llm.VideoLLM`'s ``state_dict`` (``llm.*``,
``mm_projector.*``, ``extra_embeddings.*``, ``vision_tower.*``, ``matching.*``), and the stage's tokenizer (and a
question-conditioned connector's ``qformer_tokenizer/``). Inputs and outputs are :class:`VideoLLM`'s: ``input_ids``
with ``VIDEO_TOKEN_INDEX`` at the video positions and ``video_features`` (cached vision) or ``pixel_values``
(online vision).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from pipeline.io import follow_umask, read_json, write_json
from pipeline.model.checkpoint import QUERY_TOKENIZER_DIR, build_stage_tower
from pipeline.model.connectors import build_connector, connector_settings
from pipeline.model.matching import MatchingHead
from pipeline.model.video_llm import VideoLLM

HF_MODEL_TYPE = "video_llm_hf"
TOWER_CONFIG_FILES = ("config.json", "preprocessor_config.json")
"""The files a transformers-backed tower (``hf_clip``, ``multichannel_clip``) reads from its ``model`` folder."""
HF_TOWERS = ("hf_clip", "multichannel_clip")


class VideoLLMHFConfig(PretrainedConfig):
    """The config of an exported video-LLM.

    Args:
        text_config: the LLM's config (a ``PretrainedConfig`` or its dict).
        stage: the stage's metadata (:func:`pipeline.model.checkpoint.read_stage_config`'s keys) without paths:
            ``llm`` null, ``adapters`` empty (merged), ``vision_tower_weights`` null, an online stage's tower's
            ``pretrained`` null (its weights are in the folder; a cached stage's names the tower its features need),
            ``connector`` resolved (:func:`connector_settings`); plus ``extra_tokens``, the rows of
            ``extra_embeddings`` (0 without).
        tower_files: ``{file name: JSON dict}`` of the tower's own config files for towers that read a
            transformers folder (:data:`HF_TOWERS`), so that loading needs neither the hub nor the original folder.
    """

    model_type = HF_MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: PretrainedConfig | dict | None = None, stage: dict | None = None,
                 tower_files: dict | None = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = AutoConfig.for_model(**text_config)
        self.text_config = text_config
        self.stage = stage or {}
        self.tower_files = tower_files or {}
        super().__init__(**kwargs)


@contextlib.contextmanager
def _quiet_random_weights_warning():
    """The tower is built without ``pretrained`` weights, then loaded from the folder: its "RANDOM weights"
    warning (:func:`pipeline.vision.build_tower`) does not apply and is not logged."""
    vision_log = logging.getLogger("pipeline.vision")
    level = vision_log.level
    vision_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        vision_log.setLevel(level)


def _build_tower(meta: dict, tower_files: dict) -> nn.Module:
    """The stage's vision tower architecture (weights drawn at random, to be loaded), built from ``tower_files``
    written to a temporary folder when the backend reads one."""
    with tempfile.TemporaryDirectory() as folder, _quiet_random_weights_warning():
        settings = dict(meta["vision_tower"])
        if tower_files:
            for name, content in tower_files.items():
                write_json(Path(folder) / name, content)
            settings["model"] = folder
        return build_stage_tower({**meta, "vision_tower": settings, "vision_tower_weights": None},
                                 torch.get_default_dtype())


def _keep_fixed_buffers(part: nn.Module) -> None:
    """Record on each module of ``part`` a copy of its non-persistent buffers (values its constructor computes, such
    as UMT's position embeddings, never in a state dict) as ``_fixed_buffers``."""
    for module in part.modules():
        names = getattr(module, "_non_persistent_buffers_set", ())
        module._fixed_buffers = {name: module._buffers[name].clone() for name in names
                                 if module._buffers.get(name) is not None}


class VideoLLMForCausalLM(PreTrainedModel):
    """A :class:`~pipeline.model.video_llm.VideoLLM` as a ``transformers`` model: the same submodules as direct
    children (so that the LLM's tied weights, ``_no_split_modules`` and attention settings reach the top), the same
    ``forward`` and ``generate``.

    Args:
        config: a :class:`VideoLLMHFConfig`; the LLM is built from ``config.text_config`` (random weights until
            ``from_pretrained`` loads them), the connector, tower and heads from ``config.stage``.
    """

    config_class = VideoLLMHFConfig
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True

    def __init__(self, config: VideoLLMHFConfig):
        super().__init__(config)
        meta = config.stage
        self.llm = AutoModelForCausalLM.from_config(config.text_config)
        hidden = meta["hidden_size"]
        self.mm_projector = build_connector(meta["mm_projector_type"], meta["mm_hidden_size"], hidden,
                                            meta.get("connector"))
        self.extra_embeddings = nn.Embedding(meta["extra_tokens"], hidden) if meta["extra_tokens"] else None
        self.vision_tower = _build_tower(meta, config.tower_files) if meta.get("vision") == "online" else None
        matching = meta.get("matching")
        self.matching = (MatchingHead(hidden, matching["token_id"], matching["alpha"],
                                      matching["bidirectional_frames"]) if matching else None)
        for part in (self.mm_projector, self.extra_embeddings, self.vision_tower, self.matching):
            if part is not None:
                _keep_fixed_buffers(part)
        self.post_init()

    @classmethod
    def get_init_context(cls, *args, **kwargs):
        """``from_pretrained`` builds the model on the CPU, not on the meta device, with initialisation skipped:
        towers compute non-persistent buffers in their constructors (UMT's position embeddings) that loading
        would not restore."""
        from transformers import initialization

        contexts = super().get_init_context(*args, **kwargs)
        if not any(isinstance(context, torch.device) for context in contexts):  # ZeRO-3's own initialisation
            return contexts
        return [context for context in contexts if not isinstance(context, torch.device)] + [
            initialization.no_init_weights()]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Put back the constructor's values of ``module``'s non-persistent buffers (:func:`_keep_fixed_buffers`),
        which ``from_pretrained`` replaces with empty tensors; every weight of ours is in the folder, and the
        transformers models inside (the LLM, a CLIP tower) initialise their own buffers."""
        for name, value in module.__dict__.pop("_fixed_buffers", {}).items():
            module._buffers[name].copy_(value)

    @property
    def video_llm(self) -> VideoLLM:
        """The :class:`VideoLLM` made of this model's submodules (the same objects)."""
        view = VideoLLM(self.llm, self.mm_projector, self.extra_embeddings, self.config.stage["base_vocab"],
                        self.vision_tower, self.matching)
        return view.train(self.training)

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's input embeddings (ids below ``base_vocab``)."""
        return self.llm.get_input_embeddings()

    def forward(self, *args, **kwargs):
        """:meth:`VideoLLM.forward`: ``input_ids`` ``(B, L)`` int64 with ``VIDEO_TOKEN_INDEX`` at the video
        positions, ``video_features`` ``(sum N_i, D)`` with ``visual_layout`` ``(K, 2)`` or ``pixel_values``
        ``(sum T_i, 3, H, W)`` uint8 with ``visual_frames`` ``(K,)``; returns the LLM's output (``logits``
        ``(B, L, V)``, ``V + 1`` with matching)."""
        return self.video_llm(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """:meth:`VideoLLM.generate`: from left-padded prompts, only the new tokens ``(B, new)`` int64 (with
        matching, also the frame of each ``<vid>``)."""
        return self.video_llm.generate(*args, **kwargs)


AutoConfig.register(HF_MODEL_TYPE, VideoLLMHFConfig)
AutoModel.register(VideoLLMHFConfig, VideoLLMForCausalLM)
AutoModelForCausalLM.register(VideoLLMHFConfig, VideoLLMForCausalLM)


def _tower_files(settings: dict) -> dict:
    """The config files a :data:`HF_TOWERS` tower reads from its ``model`` (a local folder or a hub name), as JSON
    dicts; ``{}`` for other towers."""
    if settings.get("backend") not in HF_TOWERS:
        return {}
    from transformers.utils import cached_file

    files = {}
    for name in TOWER_CONFIG_FILES:
        path = cached_file(settings["model"], name, _raise_exceptions_for_missing_entries=False)
        if path is not None:
            files[name] = read_json(path)
    return files


def hf_config(model: VideoLLM, meta: dict) -> VideoLLMHFConfig:
    """The :class:`VideoLLMHFConfig` of a loaded stage (``model``, ``meta`` from
    :func:`pipeline.model.checkpoint.load_stage`)."""
    stage = copy.deepcopy({**meta, "llm": None, "adapters": [], "vision_tower_weights": None,
                           "connector": connector_settings(meta.get("connector")),
                           "extra_tokens": model.extra_embeddings.num_embeddings if model.extra_embeddings else 0})
    files = {}
    if stage.get("vision") == "online":  # the tower's weights are in the folder (a cached stage's made its features)
        files = _tower_files(stage["vision_tower"])
        stage["vision_tower"]["pretrained"] = None
    return VideoLLMHFConfig(text_config=model.llm.config, stage=stage, tower_files=files)


def save_hf(model: VideoLLM, meta: dict, folder: str | os.PathLike, tokenizer_folder: str | os.PathLike,
            dtype: torch.dtype = torch.float32, max_shard_size: str = "5GB") -> None:
    """Write ``model`` (every part, in ``dtype``) as a folder :class:`VideoLLMForCausalLM` loads, with the stage's
    tokenizer and ``qformer_tokenizer/`` copied from ``tokenizer_folder`` (the stage folder).

    Args:
        model, meta: :func:`pipeline.model.checkpoint.load_stage`'s.
        max_shard_size: the largest weights file, as ``save_pretrained`` takes it (``"5GB"``).

    Raises:
        ValueError: the config does not rebuild the model's parameters exactly (names or shapes).
    """
    folder, source = Path(folder), Path(tokenizer_folder)
    config = hf_config(model, meta)
    config.dtype = dtype
    with torch.device("meta"):
        wrapper = VideoLLMForCausalLM(config)
    state = {key: value.to(dtype) for key, value in model.state_dict().items()}
    expected = wrapper.state_dict()
    if expected.keys() != state.keys() or any(expected[k].shape != state[k].shape for k in state):
        raise ValueError(f"the exported config rebuilds other parameters than the stage's: missing "
                         f"{sorted(state.keys() - expected.keys())[:5]}, unexpected "
                         f"{sorted(expected.keys() - state.keys())[:5]}")
    wrapper.load_state_dict(state, assign=True)
    wrapper.llm.tie_weights()
    wrapper.save_pretrained(folder, max_shard_size=max_shard_size)
    copy_tokenizers(source, folder)
    follow_umask(folder)


def copy_tokenizers(source: Path, dest: Path) -> None:
    """Save the stage folder ``source``'s tokenizer (added tokens included) and copy its ``qformer_tokenizer/``
    into ``dest``."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(dest)
    if (source / QUERY_TOKENIZER_DIR).is_dir():
        shutil.copytree(source / QUERY_TOKENIZER_DIR, dest / QUERY_TOKENIZER_DIR, dirs_exist_ok=True)
