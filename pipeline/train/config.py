"""A training stage's settings (:class:`StageConfig`, one validated YAML file) and paths (:class:`StagePaths`).

``resolve_stage`` turns the workflow config (``config/config.yaml`` or a recipe) into a :class:`StageConfig`
dict; the Snakemake rule ``stage_config`` writes it to ``results/train/<stage>/stage.yaml``, so a change of any
setting reruns exactly that stage and what follows, and every checkpoint carries the settings it was made with.
Where a stage reads and writes is not a setting: the training rule passes its input and output paths on the
command line (:func:`add_path_arguments`), as ``workflow/rules/common.smk`` (``stage_inputs``) decides them.

The defaults of :class:`StageConfig` and :class:`LoraSettings` are those of the workflow schema's ``stages``
items (``workflow/schemas/config.schema.yaml``), and its enums are :data:`LLM_TRAINING`, :data:`TOWER_TRAINING`,
:data:`VISION`, :data:`PARAM_GROUPS`, :data:`SCHEDULERS`, :data:`REPORTERS`, ``TEMPLATES``, ``CONNECTORS`` and
``AUGMENTATIONS``.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import MISSING, asdict, dataclass, field, fields

from pipeline.data.templates import TEMPLATES
from pipeline.model.connectors import CONNECTORS

LLM_TRAINING = ("frozen", "lora", "full")
TOWER_TRAINING = ("frozen", "full", "lora")
CONNECTOR_TRAINING = ("frozen", "full")
VISION = ("cached", "online")
PARAM_GROUPS = ("vision_tower", "connector", "llm", "lora", "heads")
AUGMENTATIONS = ("none", "llava_ssv2", "llava_ssv2_noflip")  # pipeline.video.augment's (which imports torch)
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "linear_warmup_cosine")
# report_to names of the HF Trainer, and the module each needs
REPORTERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}


@dataclass
class LoraSettings:
    """LoRA on the LLM (Hu et al. 2021, via PEFT).

    Attributes:
        r: LoRA rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the LoRA input.
        target_modules: names of the linear layers that get adapters (``q_proj``, ``v_proj``, ...).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1 or not 0 <= self.dropout < 1 or not self.target_modules:
            raise ValueError(f"lora: need r >= 1, alpha >= 1, 0 <= dropout < 1 and target_modules, got {self}")


@dataclass
class StageConfig:
    """One training stage.

    Attributes:
        name: the stage's name (``stage1``).
        template: chat template name (``chatml``, ``vicuna_v1``).
        mm_projector_type: the connector, one of ``CONNECTORS`` (ignored when the stage starts from an earlier
            stage's folder: the connector is inherited).
        mm_projector_init: a LLaVA checkpoint (folder, hub name or weight file) whose ``mm_projector`` weights the
            new connector starts from (Video-ChatGPT: LLaVA-Lightning-7B's); ignored when starting from a stage.
        connector: the connector's own settings (``model.connector``: see ``build_connector``).
        connector_training: ``frozen``, ``full`` or a list of the connector's parts (``Connector.PARTS``: E.T.
            Chat's stage 1 trains ``[aggregator, projector]``): what of the connector trains; any added tokens'
            embeddings train unless it is ``frozen``.
        llm_training: ``frozen``, ``lora`` (adapters on ``lora.target_modules``) or ``full``.
        vision_tower_training: ``frozen``, ``full`` or ``lora`` (adapters on ``vision_lora.target_modules``;
            ``full`` and ``lora`` need ``vision`` online).
        vision_lora: LoRA settings of the tower when ``vision_tower_training`` is ``lora``.
        vision: ``cached`` (the features rule's tokens) or ``online`` (frames decoded by DataLoader workers, the
            tower in the step).
        vision_tower: the tower (:class:`pipeline.features.encoder.EncoderConfig` fields: the features section's);
            an online stage builds it, every stage records it in its folder.
        features: a cached stage's features settings that shape its tokens besides ``vision_tower`` (the features
            section's :data:`FEATURE_KEYS`: frame sampling, pooling, temporal tokens, precision), so that a new
            video can be given the tokens the stage learnt from (:mod:`pipeline.chat`); ``{}`` for online stages.
        compress: how the videos the stage's visuals come from were compressed (the compress section's
            :data:`COMPRESS_KEYS`: ``fps`` frames/s, ``size`` short side in pixels, that of ``resolution`` for an
            online stage with one, x264 ``crf`` and ``preset``).
        frames: an online stage's frame sampling (:class:`pipeline.video.frames.FrameSampling` fields).
        resolution: an online stage's tower input side in pixels; None: the tower's own.
        augment: an online stage's frame augmentation, one of ``AUGMENTATIONS``.
        video_prompt: text put before each video's question, ``{duration}`` (seconds) and ``{frames}`` filled in.
        param_groups: ``{group: {"learning_rate", "weight_decay"}}`` for every group of :data:`PARAM_GROUPS`
            (resolved: no value missing).
        lora: LoRA settings when ``llm_training`` is ``lora``.
        matching: E.T. Chat's timestamp matching, ``{"alpha", "bidirectional_frames"}``, or None
            (:class:`pipeline.model.matching.MatchingHead`).
        min_duration, max_duration: drop records whose video lasts less / more than this many seconds (None: no
            bound).
        max_answer_words: drop records whose first answer has more words (split on ``" "``) than this.
        epochs: passes over the training records.
        learning_rate: peak learning rate.
        batch_size: samples per device per step.
        gradient_accumulation_steps: steps accumulated per optimizer update.
        max_length: longest sequence in tokens (video positions included).
        warmup_ratio: fraction of the steps spent warming up the learning rate.
        lr_scheduler: one of :data:`SCHEDULERS` (``linear_warmup_cosine``: Video-LLaMA's).
        warmup_steps: optimizer steps of warmup, over ``warmup_ratio`` when set.
        warmup_start_lr, min_learning_rate: ``linear_warmup_cosine``'s start of warmup and floor.
        max_steps: optimizer steps of the stage, over ``epochs`` when set.
        weight_decay: AdamW weight decay.
        bf16: bfloat16 mixed precision (GPUs): frozen weights load in bfloat16, trained ones stay float32 (with
            DeepSpeed, its engine keeps their float32 master copy); float32 throughout otherwise.
        gradient_checkpointing: recompute LLM activations in the backward pass to save memory.
        save_steps: optimizer steps between resumable checkpoints.
        logging_steps: optimizer steps between loss log rows.
        seed: seed of initialisation and data order.
        dataloader_workers: DataLoader worker processes.
        deepspeed: a DeepSpeed JSON config, relative to the working directory, or None for none.
        video_start_end: wrap the video positions in ``<vid_start>``/``<vid_end>``, tokens added to the vocabulary
            whose embeddings train with the projector (Video-ChatGPT's ``--mm_use_vid_start_end``).
        trace_batches: append each batch's record ids to ``<output_dir>/batches.log`` (the data order).
        packing: pack each batch padding-free into one sequence (:class:`~pipeline.data.dataset.VideoCollator`),
            attention kept within each sample; the same per-token loss as padded batches, without the padding's
            compute. Not with ``matching``.
        max_frames: train on at most this many of each video's cached frames, evenly spaced (``frames`` pooling
            only; VideoChat-Flash's stages on 4 and 8 frames reuse the features cached for its long-video stages).
        report_to: where the Trainer reports metrics besides ``loss.tsv``: any of :data:`REPORTERS` that is
            installed (TensorBoard events go to ``<output_dir>/tensorboard``); ``[]`` for none.
    """

    name: str
    template: str
    mm_projector_type: str = "linear"
    mm_projector_init: str | None = None
    connector: dict = field(default_factory=dict)
    connector_training: str | list[str] = "full"
    llm_training: str = "frozen"
    vision_tower_training: str = "frozen"
    vision: str = "cached"
    vision_tower: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    compress: dict = field(default_factory=dict)
    frames: dict = field(default_factory=dict)
    resolution: int | None = None
    augment: str = "none"
    video_prompt: str | None = None
    param_groups: dict = field(default_factory=dict)
    vision_lora: LoraSettings | None = None
    lora: LoraSettings | None = None
    matching: dict | None = None
    min_duration: float | None = None
    max_duration: float | None = None
    max_answer_words: int | None = None
    epochs: float = 1.0
    learning_rate: float = 2e-5
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    warmup_steps: int | None = None
    warmup_start_lr: float = 0.0
    min_learning_rate: float = 0.0
    max_steps: int | None = None
    weight_decay: float = 0.0
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    logging_steps: int = 1
    seed: int = 0
    dataloader_workers: int = 0
    deepspeed: str | None = "config/deepspeed/zero2.json"
    video_start_end: bool = False
    trace_batches: bool = False
    packing: bool = False
    max_frames: int | None = None
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.vision_lora, dict):
            self.vision_lora = LoraSettings(**self.vision_lora)
        problems = []
        if self.template not in TEMPLATES:
            problems.append(f"template: unknown {self.template!r}; known: {sorted(TEMPLATES)}")
        if self.mm_projector_type not in CONNECTORS:
            problems.append(f"mm_projector_type: unknown {self.mm_projector_type!r}; known: {CONNECTORS}")
        if isinstance(self.connector_training, list):
            from pipeline.model.connectors import connector_parts

            unknown_parts = set(self.connector_training) - set(connector_parts(self.mm_projector_type))
            if unknown_parts or not self.connector_training:
                problems.append(f"train.connector: unknown part(s) {sorted(unknown_parts)} of "
                                f"{self.mm_projector_type}; its parts are {connector_parts(self.mm_projector_type)}")
        for key, known in (("llm_training", LLM_TRAINING), ("vision_tower_training", TOWER_TRAINING),
                           ("connector_training", CONNECTOR_TRAINING), ("vision", VISION),
                           ("augment", AUGMENTATIONS)):
            if key == "connector_training" and isinstance(self.connector_training, list):
                continue
            if getattr(self, key) not in known:
                problems.append(f"{key}: {getattr(self, key)!r} is not one of {known}")
        if self.llm_training == "lora" and self.lora is None:
            problems.append("lora: llm_training is 'lora' but no lora settings are given")
        if self.vision_tower_training == "lora" and self.vision_lora is None:
            problems.append("vision_lora: train.vision_tower is 'lora' but no vision_lora settings are given")
        if (self.connector_training, self.llm_training, self.vision_tower_training) == ("frozen",) * 3:
            problems.append("nothing trains: train.vision_tower, train.connector and train.llm are all frozen")
        if self.vision_tower_training != "frozen" and self.vision != "online":
            problems.append("train.vision_tower: a training tower needs vision: online (cached features are made "
                            "by a frozen tower)")
        if self.vision == "cached" and (self.frames or self.resolution or self.augment != "none"):
            problems.append("frames, resolution and augment are settings of online stages (vision: online); a "
                            "cached stage reads the features section's frames")
        if self.vision == "online" and self.features:
            problems.append("features: the cached features' settings; an online stage samples its own frames")
        unknown_groups = set(self.param_groups) - set(PARAM_GROUPS)
        if unknown_groups:
            problems.append(f"param_groups: unknown group(s) {sorted(unknown_groups)}; groups are {PARAM_GROUPS}")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler: {self.lr_scheduler!r} is not one of {SCHEDULERS}")
        if self.matching is not None:
            self.matching = {"alpha": 2.0, "bidirectional_frames": True, **self.matching}
            if set(self.matching) != {"alpha", "bidirectional_frames"} or self.matching["alpha"] <= 1:
                problems.append(f"matching: need alpha > 1 and bidirectional_frames only, got {self.matching}")
        if self.packing and self.matching is not None:
            problems.append("packing: matching takes one sample a row (its frame mask and loss); set packing: false")
        if (self.min_duration or 0) > (self.max_duration if self.max_duration is not None else float("inf")):
            problems.append(f"min_duration {self.min_duration} s is over max_duration {self.max_duration} s")
        if self.max_frames is not None and self.max_frames < 1:
            problems.append(f"max_frames: must be >= 1, got {self.max_frames}")
        for key in ("batch_size", "gradient_accumulation_steps", "max_length", "save_steps", "logging_steps"):
            if getattr(self, key) < 1:
                problems.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.epochs <= 0 or self.learning_rate <= 0 or not 0 <= self.warmup_ratio < 1:
            problems.append("need epochs > 0, learning_rate > 0 and 0 <= warmup_ratio < 1")
        for name in self.report_to:
            if name not in REPORTERS:
                problems.append(f"report_to: {name!r} is not one of {sorted(REPORTERS)}")
            elif not any(importlib.util.find_spec(module) for module in REPORTERS[name]):
                problems.append(f"report_to: {name!r} is not installed (pip install {REPORTERS[name][0]})")
        if problems:
            raise ValueError(f"stage {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict) -> "StageConfig":
        """Build from a dict, rejecting unknown keys by name.

        Raises:
            ValueError: unknown keys, or any check of ``__post_init__``.
        """
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"stage {data.get('name')!r}: unknown setting(s) {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """Plain dict (YAML-ready)."""
        return asdict(self)


STAGE_HYPERPARAMETERS = (
    "epochs", "learning_rate", "batch_size", "gradient_accumulation_steps", "max_length", "warmup_ratio",
    "lr_scheduler", "weight_decay", "bf16", "gradient_checkpointing", "save_steps", "logging_steps", "seed",
    "dataloader_workers", "deepspeed", "video_start_end", "trace_batches", "max_frames", "report_to", "vision",
    "resolution", "augment", "video_prompt", "matching", "min_duration", "max_duration", "max_answer_words",
    "warmup_steps", "warmup_start_lr", "min_learning_rate", "max_steps", "packing",
)
TOWER_KEYS = ("backend", "model", "pretrained", "seed", "layer", "overrides", "resize")  # of the features section
FRAME_KEYS = ("sampling", "num_frames", "fps", "min_frames", "max_frames")
# of the features section: what shapes the cached tokens besides the tower (FeatureConfig's settings, not its runtime)
FEATURE_KEYS = (*FRAME_KEYS, "pooling", "temporal_tokens", "spatial_pool", "precision")
COMPRESS_KEYS = ("fps", "size", "crf", "preset")  # of the compress section: what shapes the compressed videos


def resolve_stage(config: dict, name: str) -> dict:
    """The :class:`StageConfig` dict of stage ``name`` of a validated workflow config: its settings, no paths.

    Raises:
        ValueError: no such stage, ``init`` names a stage that is not earlier in the list, or any check of
            :class:`StageConfig` (so that a bad stage fails before any job starts, not in the training job).
    """
    names = [stage["name"] for stage in config["stages"]]
    if name not in names:
        raise ValueError(f"stages: no stage named {name!r}; stages are {names}")
    stage = config["stages"][names.index(name)]
    init = stage.get("init")
    if init is not None and init not in names[: names.index(name)]:
        raise ValueError(f"stages[{name}].init: {init!r} is not an earlier stage ({names[: names.index(name)]})")
    features = config.get("features") or {}
    resolved = {
        "name": name,
        "template": stage.get("template") or config["llm"]["template"],
        "mm_projector_type": config["model"]["mm_projector_type"],
        "mm_projector_init": stage.get("mm_projector_init") or config["model"].get("mm_projector_init"),
        "connector": config["model"].get("connector") or {},
        "connector_training": stage["train"]["connector"],
        "llm_training": stage["train"]["llm"],
        "vision_tower_training": stage["train"].get("vision_tower", "frozen"),
        "vision_tower": {key: features[key] for key in TOWER_KEYS if key in features},
        "lora": stage.get("lora") if stage["train"]["llm"] == "lora" else None,
        "vision_lora": stage.get("vision_lora") if stage["train"].get("vision_tower") == "lora" else None,
        **{key: stage[key] for key in STAGE_HYPERPARAMETERS if key in stage},
    }
    compress = config.get("compress") or {}
    resolved["compress"] = {key: compress[key] for key in COMPRESS_KEYS if key in compress}
    if resolved.get("vision") == "online":  # the features section's frames, with the stage's own over them
        resolved["frames"] = {**{key: features[key] for key in FRAME_KEYS if key in features},
                              **(stage.get("frames") or {})}
        if resolved.get("resolution"):  # its videos are compressed at that size (common.smk compressed_folder)
            resolved["compress"]["size"] = resolved["resolution"]
    else:
        resolved["features"] = {key: features[key] for key in FEATURE_KEYS if key in features}
        if stage.get("frames"):
            resolved["frames"] = stage["frames"]  # refused by StageConfig: frames are an online stage's
    groups = stage.get("param_groups") or {}
    resolved["param_groups"] = {
        group: {"learning_rate": resolved.get("learning_rate", StageConfig.learning_rate),
                "weight_decay": resolved.get("weight_decay", StageConfig.weight_decay), **(groups.get(group) or {})}
        for group in (*PARAM_GROUPS, *(set(groups) - set(PARAM_GROUPS)))}
    StageConfig.from_dict(resolved)
    return resolved


@dataclass
class StagePaths:
    """Where a stage reads and writes, as its training rule passes them (``stage_inputs`` in
    ``workflow/rules/common.smk`` decides them; nothing here computes a path).

    Attributes:
        train_data: JSON list of LLaVA records to train on.
        init: what the stage starts from: an earlier stage's ``model/`` folder, or the base LLM (hub name or
            local folder) with a new ``mm_projector``.
        output_dir: the stage's folder (``model/``, ``loss.tsv``, ``checkpoints/``, ``tensorboard/``).
        features_index: the features ``index.tsv`` (a cached stage's visuals).
        videos: the compressed videos' ``index.tsv`` (``video_id``, ``path``, ``frames``, ``fps``, ``duration``: an
            online stage's visuals).
    """

    train_data: str
    init: str
    output_dir: str
    features_index: str | None = None
    videos: str | None = None

    @property
    def model_dir(self) -> str:
        """The stage folder this stage writes: ``<output_dir>/model``."""
        return f"{self.output_dir}/model"

    def argv(self) -> list[str]:
        """The command-line options of :func:`add_path_arguments` that give these paths."""
        return [item for f in fields(self) if getattr(self, f.name) is not None
                for item in (f"--{f.name.replace('_', '-')}", getattr(self, f.name))]


PATH_HELP = {"train_data": "the stage's records (JSON)",
             "init": "an earlier stage's model folder, or the base LLM (hub name or folder)",
             "output_dir": "the stage's folder (model/, loss.tsv, checkpoints/)",
             "features_index": "the features index.tsv (vision: cached)",
             "videos": "the compressed videos' index.tsv (vision: online)"}


def add_path_arguments(parser: argparse.ArgumentParser) -> None:
    """``--train-data --init --output-dir`` (required) and ``--features-index`` or ``--videos``
    (:class:`StagePaths`), the options of ``pipeline.train.launch`` and of every process it starts (none is a
    prefix of a ``torchrun`` option, which torchrun's parser would take for its own)."""
    for f in fields(StagePaths):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, required=f.default is MISSING,
                            help=PATH_HELP[f.name])


def paths_from_args(args: argparse.Namespace) -> StagePaths:
    """The :class:`StagePaths` of parsed :func:`add_path_arguments` options."""
    return StagePaths(**{f.name: getattr(args, f.name) for f in fields(StagePaths)})
