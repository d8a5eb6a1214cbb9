"""A training stage's settings (:class:`StageConfig`, one validated YAML file) and paths (:class:`StagePaths`).

``resolve_stage`` turns the workflow config (``config/config.yaml`` or a recipe) into a :class:`StageConfig`
dict; the Snakemake rule ``stage_config`` writes it to ``results/train/<stage>/stage.yaml``, so a change of any
setting reruns exactly that stage and what follows, and every checkpoint carries the settings it was made with.
Where a stage reads and writes is not a setting: the training rule passes its input and output paths on the
command line (:func:`add_path_arguments`), as ``workflow/rules/common.smk`` (``stage_inputs``) decides them.

The defaults of :class:`StageConfig` and :class:`LoraSettings` are those of the workflow schema's ``stages``
items (``workflow/schemas/config.schema.yaml``), and its enums are :data:`LLM_TRAINING`, :data:`SCHEDULERS`,
:data:`REPORTERS`, ``TEMPLATES`` and ``PROJECTORS``.
"""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import asdict, dataclass, field, fields

from pipeline.data.templates import TEMPLATES
from pipeline.model.projector import PROJECTORS

LLM_TRAINING = ("frozen", "lora", "full")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
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
        mm_projector_type: ``linear`` or ``mlp2x_gelu`` (ignored when the stage starts from an earlier stage's
            folder: the projector is inherited).
        mm_projector_init: a LLaVA checkpoint (folder, hub name or weight file) whose ``mm_projector`` weights the
            new projector starts from (Video-ChatGPT: LLaVA-Lightning-7B's); ignored when starting from a stage.
        train_mm_projector: whether the projector trains.
        llm_training: ``frozen``, ``lora`` (adapters on ``lora.target_modules``) or ``full``.
        lora: LoRA settings when ``llm_training`` is ``lora``.
        epochs: passes over the training records.
        learning_rate: peak learning rate.
        batch_size: samples per device per step.
        gradient_accumulation_steps: steps accumulated per optimizer update.
        max_length: longest sequence in tokens (video positions included).
        warmup_ratio: fraction of the steps spent warming up the learning rate.
        lr_scheduler: ``cosine``, ``linear``, ``constant`` or ``constant_with_warmup``.
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
        max_frames: train on at most this many of each video's cached frames, evenly spaced (``frames`` pooling
            only; VideoChat-Flash's stages on 4 and 8 frames reuse the features cached for its long-video stages).
        report_to: where the Trainer reports metrics besides ``loss.tsv``: any of :data:`REPORTERS` that is
            installed (TensorBoard events go to ``<output_dir>/tensorboard``); ``[]`` for none.
    """

    name: str
    template: str
    mm_projector_type: str = "linear"
    mm_projector_init: str | None = None
    train_mm_projector: bool = True
    llm_training: str = "frozen"
    lora: LoraSettings | None = None
    epochs: float = 1.0
    learning_rate: float = 2e-5
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 2048
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
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
    max_frames: int | None = None
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        problems = []
        if self.template not in TEMPLATES:
            problems.append(f"template: unknown {self.template!r}; known: {sorted(TEMPLATES)}")
        if self.mm_projector_type not in PROJECTORS:
            problems.append(f"mm_projector_type: unknown {self.mm_projector_type!r}; known: {PROJECTORS}")
        if self.llm_training not in LLM_TRAINING:
            problems.append(f"llm_training: {self.llm_training!r} is not one of {LLM_TRAINING}")
        if self.llm_training == "lora" and self.lora is None:
            problems.append("lora: llm_training is 'lora' but no lora settings are given")
        if not self.train_mm_projector and self.llm_training == "frozen":
            problems.append("nothing trains: train_mm_projector is false and llm_training is 'frozen'")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"lr_scheduler: {self.lr_scheduler!r} is not one of {SCHEDULERS}")
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
    "dataloader_workers", "deepspeed", "video_start_end", "trace_batches", "max_frames", "report_to",
)


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
    resolved = {
        "name": name,
        "template": stage.get("template") or config["llm"]["template"],
        "mm_projector_type": config["model"]["mm_projector_type"],
        "mm_projector_init": config["model"].get("mm_projector_init"),
        "train_mm_projector": stage["train"]["mm_projector"],
        "llm_training": stage["train"]["llm"],
        "lora": stage.get("lora") if stage["train"]["llm"] == "lora" else None,
        **{key: stage[key] for key in STAGE_HYPERPARAMETERS if key in stage},
    }
    StageConfig.from_dict(resolved)
    return resolved


@dataclass
class StagePaths:
    """Where a stage reads and writes, as its training rule passes them (``stage_inputs`` in
    ``workflow/rules/common.smk`` decides them; nothing here computes a path).

    Attributes:
        train_data: JSON list of LLaVA records to train on.
        features_index: the features ``index.tsv``.
        init: what the stage starts from: an earlier stage's ``model/`` folder, or the base LLM (hub name or
            local folder) with a new ``mm_projector``.
        output_dir: the stage's folder (``model/``, ``loss.tsv``, ``checkpoints/``, ``tensorboard/``).
    """

    train_data: str
    features_index: str
    init: str
    output_dir: str

    @property
    def model_dir(self) -> str:
        """The stage folder this stage writes: ``<output_dir>/model``."""
        return f"{self.output_dir}/model"

    def argv(self) -> list[str]:
        """The command-line options of :func:`add_path_arguments` that give these paths."""
        return [item for f in fields(self) for item in (f"--{f.name.replace('_', '-')}", getattr(self, f.name))]


def add_path_arguments(parser: argparse.ArgumentParser) -> None:
    """``--train-data --features-index --init --output-dir`` (:class:`StagePaths`, all required), the options
    of ``pipeline.train.launch`` and of every process it starts (none is a prefix of a ``torchrun`` option,
    which torchrun's parser would take for its own)."""
    helps = {"train_data": "the stage's records (JSON)", "features_index": "the features index.tsv",
             "init": "an earlier stage's model folder, or the base LLM (hub name or folder)",
             "output_dir": "the stage's folder (model/, loss.tsv, checkpoints/)"}
    for f in fields(StagePaths):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, required=True, help=helps[f.name])


def paths_from_args(args: argparse.Namespace) -> StagePaths:
    """The :class:`StagePaths` of parsed :func:`add_path_arguments` options."""
    return StagePaths(**{f.name: getattr(args, f.name) for f in fields(StagePaths)})
