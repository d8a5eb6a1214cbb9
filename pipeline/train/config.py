"""A training stage's resolved settings: everything one stage run needs, in one validated YAML file.

``resolve_stage`` turns the workflow config (``config/config.yaml`` or a recipe) into a :class:`StageConfig`
dict; the Snakemake rule ``stage_config`` writes it to ``results/train/<stage>/stage.yaml``, so a change of any
setting reruns exactly that stage and what follows, and every checkpoint carries the settings it was made with.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from pipeline.data.templates import TEMPLATES
from pipeline.model.projector import PROJECTORS

LLM_TRAINING = ("frozen", "lora", "full")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


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
        name: the stage's name (``stage1``); its outputs go to ``output_dir``.
        llm: base LLM, hub name or local folder (used when ``init`` is None, and for the tokenizer).
        template: chat template name (``chatml``, ``vicuna_v1``).
        train_data: JSON list of LLaVA records to train on.
        features_index: the features ``index.tsv``.
        output_dir: the stage's folder (``model/``, ``loss.tsv``, ``checkpoints/``).
        init: a previous stage's ``model/`` folder to start from; None starts from ``llm`` with a new projector.
        mm_projector_type: ``linear`` or ``mlp2x_gelu`` (ignored with ``init``: the projector is inherited).
        mm_projector_init: a LLaVA checkpoint (folder, hub name or weight file) whose ``mm_projector`` weights the
            new projector starts from (Video-ChatGPT: LLaVA-Lightning-7B's); ignored with ``init``.
        train_mm_projector: whether the projector trains.
        llm_training: ``frozen``, ``lora`` (adapters on ``lora.target_modules``) or ``full``.
        lora: LoRA settings when ``llm_training`` is ``lora``.
        epochs: passes over ``train_data``.
        learning_rate: peak learning rate.
        batch_size: samples per device per step.
        gradient_accumulation_steps: steps accumulated per optimizer update.
        max_length: longest sequence in tokens (video positions included).
        warmup_ratio: fraction of the steps spent warming up the learning rate.
        lr_scheduler: ``cosine``, ``linear``, ``constant`` or ``constant_with_warmup``.
        weight_decay: AdamW weight decay.
        bf16: bfloat16 training (GPUs); float32 otherwise.
        gradient_checkpointing: recompute LLM activations in the backward pass to save memory.
        save_steps: optimizer steps between resumable checkpoints.
        logging_steps: optimizer steps between loss log rows.
        seed: seed of initialisation and data order.
        dataloader_workers: DataLoader worker processes.
        deepspeed: a DeepSpeed JSON config (``config/deepspeed/zero2.json``) or None.
        video_start_end: wrap the video positions in ``<vid_start>``/``<vid_end>``, tokens added to the vocabulary
            whose embeddings train with the projector (Video-ChatGPT's ``--mm_use_vid_start_end``).
        trace_batches: append each batch's record ids to ``<output_dir>/batches.log`` (the data order).
        max_frames: train on at most this many of each video's cached frames, evenly spaced (``frames`` pooling
            only; VideoChat-Flash's stages on 4 and 8 frames reuse the features cached for its long-video stages).
    """

    name: str
    llm: str
    template: str
    train_data: str
    features_index: str
    output_dir: str
    init: str | None = None
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
    deepspeed: str | None = None
    video_start_end: bool = False
    trace_batches: bool = False
    max_frames: int | None = None

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
    "dataloader_workers", "deepspeed", "video_start_end", "trace_batches", "max_frames",
)


def resolve_stage(config: dict, name: str, results: str = "results") -> dict:
    """The :class:`StageConfig` dict of stage ``name`` of a validated workflow config.

    A stage's ``init`` names an earlier stage (its ``model/`` folder is the start) or is null (the base LLM and
    a new ``mm_projector``). Paths follow the workflow's layout under ``results``.

    Raises:
        ValueError: no such stage, or ``init`` names a stage that is not earlier in the list.
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
        "llm": config["llm"]["name_or_path"],
        "template": stage.get("template") or config["llm"]["template"],
        "train_data": f"{results}/train/{name}/data.json",
        "features_index": f"{results}/features/index.tsv",
        "output_dir": f"{results}/train/{name}",
        "init": None if init is None else f"{results}/train/{init}/model",
        "mm_projector_type": config["model"]["mm_projector_type"],
        "mm_projector_init": config["model"].get("mm_projector_init"),
        "train_mm_projector": stage["train"]["mm_projector"],
        "llm_training": stage["train"]["llm"],
        "lora": stage.get("lora") if stage["train"]["llm"] == "lora" else None,
        **{key: stage[key] for key in STAGE_HYPERPARAMETERS if key in stage},
    }
    StageConfig.from_dict(resolved)  # fail here, before any job starts, not in the training job
    return resolved


def stage_model_dir(config: StageConfig) -> Path:
    """Where a stage's final model folder goes."""
    return Path(config.output_dir) / "model"
