"""A training stage's model, Trainer and callbacks, and :func:`run_stage`, which trains it (the work of
``python -m pipeline.train.stage``, see :mod:`pipeline.train.stage`)."""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import resource
import shutil
import signal
import socket
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from pipeline.data.dataset import (
    CachedVisuals,
    InstructionDataset,
    VideoCollator,
    filter_records,
    fit_records,
    visual_tokens,
)
from pipeline.data.instructions import record_kind
from pipeline.data.templates import VIDEO_WRAP, get_template, video_wrap_ids
from pipeline.features.store import FeatureStore
from pipeline.io import atomic_path, publish_dir, read_json, read_yaml, write_json, write_table, write_yaml
from pipeline.model.checkpoint import (
    build_stage_tower,
    is_stage_folder,
    llm_source,
    load_stage,
    load_trained,
    read_stage_config,
    save_trained,
    stage_query_tokenizer,
    write_stage_folder,
)
from pipeline.model.connectors import build_connector
from pipeline.model.connectors.weights import projector_weights
from pipeline.model.matching import MATCH_TOKEN, MatchingHead
from pipeline.model.video_llm import VideoLLM, gathered, load_llm
from pipeline.train.config import StageConfig, StagePaths
from pipeline.train.weights_only import restrict_torch_load

log = logging.getLogger(__name__)

LOSS_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mib"]
PREEMPTED = 143  # the exit code of a process ended by SIGTERM
COMPLETE = "complete"  # the mark of a checkpoint written whole


def stage_tokenizer(config: StageConfig, init: str):
    """The stage's tokenizer and its size before added tokens: the ``init`` stage folder's (with any tokens earlier
    stages added) or the base LLM's, with the video wrap tokens and matching's ``<vid>`` added when the stage asks
    for them."""
    tokenizer = AutoTokenizer.from_pretrained(init)
    base_vocab = read_stage_config(init)["base_vocab"] if is_stage_folder(init) else None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_vocab = len(tokenizer) if base_vocab is None else base_vocab
    if config.video_start_end and not set(VIDEO_WRAP) <= set(tokenizer.get_vocab()):
        tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEO_WRAP)})
    if config.matching and MATCH_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MATCH_TOKEN]})
    return tokenizer, base_vocab


def precision(config: StageConfig) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of a stage's frozen and of its trained weights.

    ``bf16`` without DeepSpeed: frozen weights bfloat16, trained ones float32, and the Trainer's bfloat16 autocast
    does the mixed precision (as Video-ChatGPT's ``train.py``): AdamW on bfloat16 weights would round away every
    update below half a bfloat16 ulp, at lr 2e-5 most of a 1024 x 4096 projector's. ``bf16`` with DeepSpeed:
    bfloat16 throughout, as the engine wants its module (under ZeRO-3 it does not cast partitioned weights
    itself), and its optimizer keeps the trained weights' float32 master copy. float32 otherwise.
    """
    if not config.bf16:
        return torch.float32, torch.float32
    return torch.bfloat16, torch.bfloat16 if config.deepspeed else torch.float32


def build_model(config: StageConfig, init: str, feature_dim: int, tokenizer=None, base_vocab: int | None = None,
                tower: nn.Module | None = None) -> tuple[VideoLLM, dict]:
    """The stage's model with exactly the stage's parameters trainable (its freeze table), in the dtypes of
    :func:`precision`, and its stage metadata (:mod:`pipeline.model.checkpoint`, paths absolute).

    Args:
        init: an earlier stage's folder, or the base LLM (hub name or folder) with a new connector.
        feature_dim: D, the width of the vision tokens.
        tokenizer, base_vocab: the stage's tokenizer and its size before added tokens; with more tokens than that,
            the model gets (or keeps) an embedding table for them, initialised to the LLM's mean embedding.
        tower: the vision tower of an online stage (:func:`stage_tower`); None for a cached stage.

    Raises:
        ValueError: the previous stage's connector expects another width than ``feature_dim``.
    """
    frozen, trained = precision(config)
    llm_dtype = trained if config.llm_training == "full" else frozen
    if is_stage_folder(init):
        model, previous = load_stage(init, llm_dtype, mm_dtype=trained, tower=False)  # the stage's: stage_tower
        if previous["mm_hidden_size"] != feature_dim:
            raise ValueError(f"{init}: mm_projector takes {previous['mm_hidden_size']}-wide features, "
                             f"the features are {feature_dim} wide")
        meta = {key: previous[key] for key in ("base_llm", "llm", "adapters", "mm_projector_type", "mm_hidden_size",
                                               "hidden_size")}
        meta["vision_tower_weights"] = previous.get("vision_tower_weights")
        meta["connector"] = previous.get("connector") or {}
    else:
        llm = load_llm(init, llm_dtype)
        hidden = llm.get_input_embeddings().embedding_dim  # the weight may be ZeRO-3 partitioned
        projector = build_connector(config.mm_projector_type, feature_dim, hidden,
                                    config.connector)
        if config.mm_projector_init:
            _init_projector(projector, config.mm_projector_init)
        model = VideoLLM(llm, projector.to(trained))
        meta = {"base_llm": str(Path(init).resolve()) if Path(init).exists() else init, "llm": None,
                "adapters": [], "mm_projector_type": config.mm_projector_type, "mm_hidden_size": feature_dim,
                "hidden_size": hidden, "vision_tower_weights": None, "connector": config.connector}
    added = len(tokenizer) - base_vocab if tokenizer is not None and base_vocab is not None else 0
    if added and (model.extra_embeddings is None or model.extra_embeddings.num_embeddings != added):
        weight = model.llm.get_input_embeddings().weight
        with gathered(weight):
            mean = weight.detach().float().mean(0)
        model.extra_embeddings = nn.Embedding.from_pretrained(mean.repeat(added, 1).to(trained), freeze=False)
        model.base_vocab = base_vocab
    meta["base_vocab"] = model.base_vocab if model.extra_embeddings is not None else None
    if config.matching and model.matching is None:
        model.matching = _matching_head(model, config, tokenizer, trained)
    elif model.matching is not None and not config.matching:
        model.matching = None  # a stage without matching drops the head an earlier one trained
    if model.matching is not None:
        model.matching.alpha = config.matching["alpha"]
        model.matching.bidirectional_frames = config.matching["bidirectional_frames"]
    meta["matching"] = ({**config.matching, "token_id": model.matching.token_id} if model.matching is not None
                        else None)
    model.vision_tower = tower
    model.requires_grad_(False)
    parts = config.connector_training
    for name, param in model.mm_projector.named_parameters():
        param.requires_grad_(parts == "full" or (isinstance(parts, list) and model.mm_projector.part(name) in parts))
    if model.extra_embeddings is not None:
        model.extra_embeddings.requires_grad_(parts != "frozen" or model.matching is not None)
    if model.matching is not None:
        model.matching.requires_grad_(True)
    if tower is not None:
        tower.requires_grad_(config.vision_tower_training == "full")
        tower.to(trained if config.vision_tower_training == "full" else frozen)
        if config.vision_tower_training == "lora":
            _tower_lora(tower, config.vision_lora, trained)
    if config.llm_training == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        model.llm = get_peft_model(model.llm, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ))
        model.llm.peft_config["default"].base_model_name_or_path = llm_source(meta)  # never a cwd-relative path
    elif config.llm_training == "full":
        model.llm.requires_grad_(True)
    for param in model.parameters():
        if param.requires_grad and param.dtype != trained:
            param.data = param.data.to(trained)
    meta.update(stage=config.name, llm_training=config.llm_training, template=config.template,
                video_start_end=config.video_start_end, max_frames=config.max_frames,
                vision_tower_training=config.vision_tower_training, vision=config.vision,
                vision_lora=asdict(config.vision_lora) if config.vision_tower_training == "lora" else None,
                vision_tower=config.vision_tower, frames=config.frames, resolution=config.resolution,
                video_prompt=config.video_prompt)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("stage %s: %.3f M of %.1f M parameters train (vision tower %s, connector %s, LLM %s, added tokens %d), "
             "frozen %s, trained %s", config.name, trainable / 1e6, total / 1e6,
             config.vision_tower_training if tower is not None else "cached", config.connector_training,
             config.llm_training, added, frozen, trained)
    return model, meta


def _matching_head(model: VideoLLM, config: StageConfig, tokenizer, dtype: torch.dtype) -> MatchingHead:
    """A new :class:`MatchingHead` for ``<vid>`` of ``tokenizer``, its output row the mean of the LLM's output rows
    (E.T. Chat ``etchat/train/train.py:459-465``), in ``dtype``.

    Raises:
        ValueError: ``<vid>`` is not an added token of ``tokenizer`` (its input row would be the LLM's).
    """
    token_id = tokenizer.convert_tokens_to_ids(MATCH_TOKEN)
    if model.extra_embeddings is None or token_id < model.base_vocab:
        raise ValueError(f"matching: {MATCH_TOKEN} must be a token the stage adds to the tokenizer")
    head = MatchingHead(model.llm.get_input_embeddings().embedding_dim, token_id, config.matching["alpha"],
                        config.matching["bidirectional_frames"])
    weight = model.llm.get_output_embeddings().weight
    with gathered(weight), torch.no_grad():
        head.vid_output.weight.copy_(weight.detach().float().mean(0, keepdim=True))
    return head.to(dtype)


def _tower_lora(tower: nn.Module, lora, dtype: torch.dtype) -> None:
    """Add trainable LoRA adapters (peft's ``inject_adapter_in_model``) to the tower's linear layers named by
    ``lora.target_modules``, in ``dtype``.

    Raises:
        ValueError: a target is not an ``nn.Linear`` (UMT's ``patch_embed.proj`` is a convolution: name
            ``attn.proj``), or lies in an ``nn.MultiheadAttention``, which reads its projections' weights directly
            (open_clip), so that adapters there would never train.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    inject_adapter_in_model(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       target_modules=lora.target_modules), tower)
    for name, module in tower.named_modules():
        if isinstance(module, LoraLayer) and not isinstance(module.get_base_layer(), nn.Linear):
            raise ValueError(f"vision_lora.target_modules: {name} is a {type(module.get_base_layer()).__name__}, "
                             "not a linear layer (UMT: name attn.proj, not proj, which is also its patch embedding)")
        if isinstance(module, nn.MultiheadAttention) and any("lora_" in n for n, _ in module.named_parameters()):
            raise ValueError(f"vision_lora.target_modules: {name} is an nn.MultiheadAttention, which reads its "
                             "projections' weights directly, so adapters there would never train (open_clip: "
                             "target mlp.c_fc and mlp.c_proj)")
    for name, param in tower.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)


def parameter_group(name: str) -> str:
    """The parameter group of a :class:`VideoLLM` parameter by its name: ``lora`` (any LoRA adapter), ``vision_tower``,
    ``connector`` (``mm_projector`` and the added tokens' ``extra_embeddings``, which train with it), ``heads``
    (matching's ``frm_head``, ``vid_head`` and ``<vid>`` output row) or ``llm``."""
    if "lora_" in name:
        return "lora"
    if name.startswith("matching."):
        return "heads"
    if name.startswith("vision_tower."):
        return "vision_tower"
    if name.startswith(("mm_projector.", "extra_embeddings.")):
        return "connector"
    return "llm"


def stage_tower(config: StageConfig, init: str) -> nn.Module:
    """An online stage's vision tower: the tower an earlier stage trained (its folder's
    ``vision_tower.safetensors``), else ``config.vision_tower`` with its ``pretrained`` weights, at the stage's
    ``resolution``; float32 (:func:`build_model` casts it)."""
    previous = read_stage_config(init) if is_stage_folder(init) else {}
    return build_stage_tower({"vision_tower": config.vision_tower, "resolution": config.resolution,
                              "vision_tower_weights": previous.get("vision_tower_weights")})


def visual_source(config: StageConfig, paths: StagePaths, tower: nn.Module | None):
    """The stage's visual source: :class:`CachedVisuals` of ``paths.features_index``, or for an online stage
    :class:`~pipeline.data.frames.OnlineVisuals` of ``paths.videos`` with ``tower``'s input size and the stage's
    augmentation.

    Raises:
        ValueError: the path the stage's vision needs is not given, or a cached stage follows one that trained the
            tower (the cached features were made by the untrained one).
    """
    if config.vision == "cached":
        if is_stage_folder(paths.init) and read_stage_config(paths.init).get("vision_tower_weights"):
            raise ValueError(f"stage {config.name}: {paths.init} trained the vision tower, and cached features are "
                             "the untrained tower's; this stage needs vision: online")
        if not paths.features_index:
            raise ValueError(f"stage {config.name}: vision cached needs --features-index")
        return CachedVisuals(FeatureStore(paths.features_index), config.max_frames)
    from pipeline.data.frames import online_visuals

    if not paths.videos:
        raise ValueError(f"stage {config.name}: vision online needs --videos (the compressed videos' index)")
    return online_visuals(paths.videos, config.frames, tower, config.vision_tower.get("resize", "crop"),
                          config.augment)


def _init_projector(projector: nn.Module, source: str) -> None:
    """Load ``mm_projector`` weights from a LLaVA checkpoint into a new projector.

    Raises:
        ValueError: the checkpoint's projector has other names or shapes (another type, feature or LLM width).
    """
    if hasattr(projector, "load_original"):  # a Q-Former connector: its released .pth, weights only
        projector.load_original(source)
        log.info("%s initialised from %s", type(projector).__name__, source)
        return
    weights = projector_weights(source)
    expected = {name: tuple(p.shape) for name, p in projector.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        raise ValueError(f"mm_projector_init {source}: its mm_projector {found} does not fit this stage's {expected}")
    projector.load_state_dict(weights)
    log.info("mm_projector initialised from %s", source)


def peak_memory_mib(device: torch.device) -> float:
    """This process's peak memory in MiB: CUDA's peak allocated memory on a GPU, else the peak resident set size
    (``ru_maxrss``, KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class VideoLLMTrainer(Trainer):
    """The HF Trainer, saving and loading checkpoints in the stage folder's format (only what trains).

    Args:
        stage_meta: the stage's metadata (:func:`build_model`).
    """

    def __init__(self, *args, stage_meta: dict, param_groups: dict | None = None, schedule: dict | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_meta, self.param_groups, self.schedule = stage_meta, param_groups or {}, schedule
        self._tokens, self._since = 0, time.perf_counter()
        self._masters: dict[str, torch.Tensor] = {}  # trained weights' float32 masters under DeepSpeed bf16

    def create_optimizer(self, model=None):
        """The Trainer's optimizer (AdamW by default) over one group per parameter group of the stage
        (:func:`parameter_group`: vision tower, connector, LLM, LoRA) and per decay: each group's learning rate
        and weight decay from ``param_groups``, no decay on biases and norms (the Trainer's
        ``get_decay_parameter_names``, as LLaVA-NeXT's ``create_optimizer``). The learning-rate schedule scales
        every group alike. DeepSpeed uses this optimizer as long as its config names none."""
        if self.optimizer is not None or not self.param_groups:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[str, bool], dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            group = parameter_group(name)
            settings = self.param_groups[group]
            entry = groups.setdefault((group, name in decay), {
                "params": [], "lr": settings["learning_rate"], "group": group,
                "weight_decay": settings["weight_decay"] if name in decay else 0.0})
            entry["params"].append(param)
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        self.optimizer = optimizer_cls(list(groups.values()), **kwargs)
        for (group, decays), entry in groups.items():
            log.info("optimizer group %s%s: %d tensors, lr %g, weight decay %g", group, "" if decays else " (no decay)",
                     len(entry["params"]), entry["lr"], entry["weight_decay"])
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The Trainer's schedule, or with ``schedule`` (a ``linear_warmup_cosine`` stage's settings)
        :func:`linear_warmup_cosine`, each group's learning rate scaled alike (its peak over the stage's)."""
        if self.schedule is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        settings = self.schedule
        warmup = settings["warmup_steps"]
        warmup = math.ceil(settings["warmup_ratio"] * num_training_steps) if warmup is None else warmup

        def factor(step: int) -> float:
            return linear_warmup_cosine(step, num_training_steps, settings["learning_rate"], warmup,
                                        settings["warmup_start_lr"], settings["min_learning_rate"]
                                        ) / settings["learning_rate"]

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler

    def compute_loss(self, model, inputs, *args, **kwargs):
        # this step's tokens, video positions included (a packed batch has no padding, nor attention_mask); summed on
        # the device, read only when logging (no sync)
        mask = inputs.get("attention_mask")
        self._tokens = self._tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds ``tokens_per_second`` (non-padding tokens of all processes per second since the last loss log)
        and ``peak_memory_mib`` (:func:`peak_memory_mib` of this process)."""
        if "loss" in logs:
            now = time.perf_counter()
            tokens = int(self._tokens) * self.args.world_size
            logs["tokens_per_second"] = round(tokens / max(now - self._since, 1e-9), 1)
            logs["peak_memory_mib"] = round(peak_memory_mib(self.args.device), 1)
            self._tokens, self._since = 0, now
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """As the Trainer's, but under DeepSpeed bf16 the trained weights (not a whole LLM, which is saved in 16 bit
        as DeepSpeed gathers it) are saved from the engine's float32 master copies, not the module's bfloat16
        ones. Every rank calls it (gathering the masters is collective)."""
        self._masters = {}
        if self.is_deepspeed_enabled and self.args.bf16 and self.stage_meta["llm_training"] != "full":
            from deepspeed.utils import safe_get_full_fp32_param

            model = self.accelerator.unwrap_model(self.model)
            self._masters = {name: safe_get_full_fp32_param(p) for name, p in model.named_parameters()
                             if p.requires_grad}
        super().save_model(output_dir, _internal_call)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            model = self.accelerator.unwrap_model(self.model)
            state = {**(model.state_dict() if state_dict is None else state_dict), **self._masters}
            save_trained(model, output_dir or self.args.output_dir, self.stage_meta, state)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trained(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint, self.stage_meta)
        log.info("resumed weights from %s", resume_from_checkpoint)


def linear_warmup_cosine(step: int, total_steps: int, peak: float, warmup_steps: int, warmup_start_lr: float,
                         min_lr: float) -> float:
    """The learning rate at optimizer step ``step`` (from 0) of Video-LLaMA's ``LinearWarmupCosineLRScheduler``
    (``video_llama/common/optims.py:79-112``): ``min(peak, warmup_start_lr + (peak - warmup_start_lr) * step /
    warmup_steps)`` during the first ``warmup_steps`` steps, then ``min_lr + (peak - min_lr) * (1 + cos(pi * step /
    total_steps)) / 2`` (the cosine counts from step 0, so it starts below the peak after the warmup)."""
    if step < warmup_steps:
        return min(peak, warmup_start_lr + (peak - warmup_start_lr) * step / max(warmup_steps, 1))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class StepLog(TrainerCallback):
    """One line per logging step on the first process, in place of the Trainer's printed dicts::

        step 12/120 (10%), epoch 0.20: loss 2.3141, lr 1.96e-05, grad norm 1.23, 1534 tokens/s,
        peak memory 812 MiB, elapsed 0:01:05, ETA 0:09:45

    (one line in the log). The ETA extrapolates this run's pace over the steps left (a resumed run counts from
    its checkpoint's step).
    """

    def __init__(self):
        self._start, self._first = time.monotonic(), 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start, self._first = time.monotonic(), state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.monotonic() - self._start
        if "loss" in logs:
            done, total = state.global_step, state.max_steps
            eta = elapsed / max(done - self._first, 1) * (total - done)
            grad = f", grad norm {logs['grad_norm']:.4g}" if logs.get("grad_norm") is not None else ""
            log.info("step %d/%d (%d%%), epoch %.2f: loss %.4f, lr %.3g%s, %.0f tokens/s, peak memory %.0f MiB, "
                     "elapsed %s, ETA %s", done, total, 100 * done // max(total, 1), logs.get("epoch", 0),
                     logs["loss"], logs.get("learning_rate", 0), grad, logs.get("tokens_per_second", 0),
                     logs.get("peak_memory_mib", 0), _duration(elapsed), _duration(eta))
        elif "train_runtime" in logs:
            log.info("trained to step %d/%d in %s (%.2f samples/s)", state.global_step, state.max_steps,
                     _duration(logs["train_runtime"]), logs.get("train_samples_per_second", 0))


class CheckpointComplete(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it: a killed save leaves a folder without
    the mark, which :func:`_latest_checkpoint` never resumes from."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            (Path(args.output_dir) / f"checkpoint-{state.global_step}" / COMPLETE).touch()
        return control


class Preemption(TrainerCallback):
    """On SIGTERM (SLURM's preemption or ``scancel --signal=TERM``), save a checkpoint at the end of the current
    step and stop; ``received`` tells the stage to exit without writing its model. The ranks agree on the flag
    after every step (one scalar all-reduce), so all of them save the same step even when the signal reaches
    them at different times."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received
        if torch.distributed.is_available() and torch.distributed.is_initialized() and args.world_size > 1:
            flag = torch.tensor(float(stop), device=args.device)  # ranks signalled a step apart stop together
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = self.received = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control


def _prepare_distributed(config: StageConfig) -> dict:
    """Environment for a single process and the CPU gloo backend; returns extra ``TrainingArguments``.

    On the CPU, DeepSpeed needs a process group even for one process, and the HF Trainer does not pass
    ``ddp_backend`` to accelerate on its DeepSpeed path: the state is created here with gloo and reused.
    """
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        return {}
    extra = {"use_cpu": True, "ddp_backend": "gloo"}
    if config.deepspeed:
        import deepspeed.ops
        from accelerate import PartialState

        # DeepSpeed's shared-memory all-reduce for CPUs is compiled with g++ on a machine's first stage (about 40 s
        # and 500 MiB on 2 cores, again in every fresh clone); gloo reduces without it. DeepSpeed's own switch:
        # its list of the ops this machine can build (deepspeed/comm/torch.py build_shm_op reads it).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        extra["accelerator_config"] = {"use_configured_state": True}
    return extra


def _stamp(config: StageConfig, paths: StagePaths) -> dict:
    """What a checkpoint must have been made with to be resumed: the settings and the inputs (absolute where they
    are files)."""
    inputs = {key: os.path.abspath(value) if value and Path(value).exists() else value
              for key, value in (("train_data", paths.train_data), ("features_index", paths.features_index),
                                 ("videos", paths.videos), ("init", paths.init))}
    return {"settings": config.to_dict(), "inputs": inputs}


def _latest_checkpoint(folder: Path, stamp: dict, clean: bool) -> str | None:
    """The newest complete checkpoint in ``folder`` if it was made with the same ``stamp`` (:func:`_stamp`), else
    None.

    Every rank computes the same answer; the rank with ``clean`` removes stale checkpoints and those a kill left
    half-written, and stamps the folder.
    """
    stamp_file = folder / "stage.yaml"
    stale = folder.exists() and (not stamp_file.exists() or read_yaml(stamp_file) != stamp)
    found = [] if stale else sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [path for path in found if (path / COMPLETE).exists()]
    if clean:
        if stale:
            log.warning("%s: checkpoints made with other settings or inputs, starting afresh", folder)
            shutil.rmtree(folder)
        for path in set(found) - set(complete):
            log.warning("%s: written only in part (killed while saving), removed", path)
            shutil.rmtree(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_yaml(stamp_file, stamp)
    return str(complete[-1]) if complete else None


def _skipped(path: Path) -> list[dict]:
    """The records :class:`InstructionDataset` skipped at training time (``path``, JSON lines), each once."""
    if not path.exists():
        return []
    seen = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            seen.setdefault(entry["id"], entry)
    if seen:
        log.warning("%d records skipped at training time, e.g. %s", len(seen), next(iter(seen.values()))["reason"])
    return list(seen.values())


def training_arguments(config: StageConfig, output_dir: Path, extra: dict) -> TrainingArguments:
    """The HF ``TrainingArguments`` of a stage (under ZeRO-3, made before the model, they shard its loading).

    ``warmup_steps`` gets ``warmup_ratio``: transformers 5 reads a value below 1 as a share of the optimizer steps
    (``ceil(ratio * steps)`` warmup steps), as ``StageConfig`` requires it to be; a stage's ``warmup_steps`` goes
    as it is. ``linear_warmup_cosine`` is :class:`VideoLLMTrainer`'s own (the Trainer gets ``constant``).
    """
    own = config.lr_scheduler == "linear_warmup_cosine"
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps if config.warmup_steps is not None else config.warmup_ratio,
        lr_scheduler_type="constant" if own else config.lr_scheduler,
        weight_decay=config.weight_decay,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,  # the newest complete checkpoint survives while the next one is written
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=config.report_to,
        deepspeed=config.deepspeed,
        disable_tqdm=True,
        **extra,
    )


def run_stage(config: StageConfig, paths: StagePaths) -> bool:
    """Train one stage and write its outputs (see the module docstring).

    Returns:
        False when the stage stopped on SIGTERM (a checkpoint was saved; the model was not written).
    """
    restrict_torch_load()
    extra = _prepare_distributed(config)
    torch.manual_seed(config.seed)
    out = Path(paths.output_dir)
    checkpoints = out / "checkpoints"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    # Under ZeRO-3, TrainingArguments made before the model shard its loading across ranks. Merging an earlier
    # stage's LoRA adapters needs whole weights: such a stage builds its model first (the engine partitions it).
    merges = is_stage_folder(paths.init) and bool(read_stage_config(paths.init)["adapters"])
    args = None if merges else training_arguments(config, checkpoints, extra)
    records = read_json(paths.train_data)
    if not records:
        raise ValueError(f"{paths.train_data}: no training records")
    tokenizer, base_vocab = stage_tokenizer(config, paths.init)
    template = get_template(config.template)
    wrap = video_wrap_ids(tokenizer, config.video_start_end)
    tower = stage_tower(config, paths.init) if config.vision == "online" else None
    source = visual_source(config, paths, tower)
    model, meta = build_model(config, paths.init, tower.dim if tower is not None else source.dim, tokenizer,
                              base_vocab, tower)
    records, excluded = filter_records(records, source, config.min_duration, config.max_duration,
                                       config.max_answer_words)
    tokens = visual_tokens(source, records, model.mm_projector)  # every visual the records name (none: text only)
    records, unfit = fit_records(records, tokenizer, template, config.max_length, tokens, wrap, source,
                                 config.video_prompt)
    excluded += unfit
    if excluded:
        log.warning("stage %s: %d of %d records excluded (listed in model/excluded.jsonl), e.g. %s", config.name,
                    len(excluded), len(records) + len(excluded), excluded[0]["reason"])
    if not records:
        raise ValueError(f"{paths.train_data}: no record left to train on, all {len(excluded)} excluded, e.g. "
                         f"{excluded[0]['reason'] if excluded else ''}")
    skipped = out / "skipped.jsonl"  # records whose visuals failed at training time, from the DataLoader workers
    query = stage_query_tokenizer(model.mm_projector, meta["connector"], paths.init)
    dataset = InstructionDataset(records, tokenizer, template, source, model.mm_projector, config.max_length, wrap,
                                 config.video_prompt, skipped, query,
                                 model.matching.token_id if model.matching is not None else None)
    args = args or training_arguments(config, checkpoints, extra)
    resume = _latest_checkpoint(checkpoints, _stamp(config, paths), clean=args.process_index == 0)
    if not resume and args.process_index == 0:
        skipped.unlink(missing_ok=True)  # a fresh run lists its own
    collator = VideoCollator(tokenizer.pad_token_id, trace=out / "batches.log" if config.trace_batches else None,
                             packing=config.packing)
    preemption = Preemption()
    trainer = VideoLLMTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=collator, stage_meta=meta, param_groups=config.param_groups,
                              schedule=asdict(config) if config.lr_scheduler == "linear_warmup_cosine" else None,
                              callbacks=[CheckpointComplete(), preemption, StepLog()])
    trainer.remove_callback(PrinterCallback)  # StepLog prints the steps
    plugin = trainer.accelerator.state.deepspeed_plugin
    log.info("stage %s: %s, %d process(es) on %s, %d records", config.name,
             f"DeepSpeed ZeRO-{plugin.zero_stage} ({config.deepspeed})" if plugin else "no DeepSpeed",
             args.world_size, args.device, len(records))
    if resume:
        log.info("resuming from %s", resume)
    metrics = trainer.train(resume_from_checkpoint=resume).metrics
    if preemption.received:
        log.warning("stage %s: stopped on SIGTERM at step %d; rerun to resume", config.name, trainer.state.global_step)
        return False
    final = Path(paths.model_dir)
    tmp = final.with_name(final.name + ".tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # every rank: under ZeRO-3 the weights are gathered first
    if trainer.is_world_process_zero():
        write_stage_folder(tmp, meta, tokenizer, query)
        write_yaml(tmp / "stage.yaml", config.to_dict())
        skipped_at_training = _skipped(skipped)
        excluded += skipped_at_training
        with atomic_path(tmp / "excluded.jsonl") as path:  # the records this stage could not train on, and why
            path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in excluded), encoding="utf-8")
        publish_dir(tmp, final)
        rows = [{key: entry.get(key, "") for key in LOSS_COLUMNS} for entry in trainer.state.log_history
                if "loss" in entry]
        write_table(out / "loss.tsv", rows, LOSS_COLUMNS)
        write_json(out / "train_metrics.json", {  # runtime (s), samples and steps per second; the records
            **metrics, "records": len(records), "records_by_kind": dict(Counter(map(record_kind, records))),
            "excluded": len(excluded) - len(skipped_at_training), "skipped_at_training": len(skipped_at_training)})
        shutil.rmtree(checkpoints, ignore_errors=True)
        log.info("stage %s done: %s, %d loss rows", config.name, final, len(rows))
    return True
