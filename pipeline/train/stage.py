"""Run one training stage with the Hugging Face Trainer (and DeepSpeed when the stage names a config).

``python -m pipeline.train.stage --config results/train/<stage>/stage.yaml`` is what every process of a stage runs;
:mod:`pipeline.train.launch` starts one per GPU (or per CPU process). The stage:

1. builds the model: the base LLM and a new ``mm_projector``, or the previous stage's model folder (its adapters
   merged); then freezes everything and unfreezes what the stage trains (projector, LoRA adapters, or the LLM, and
   the embeddings of tokens the stage adds);
2. trains on the records that fit ``max_length`` with their cached features, logging loss, learning rate, grad
   norm and tokens per second (``loss.tsv``, TensorBoard), checkpointing every ``save_steps`` to
   ``<output_dir>/checkpoints`` and resuming from the newest checkpoint made with the same settings;
3. on SIGTERM (a scheduler's preemption) saves a checkpoint and exits with 143 without writing the model, so a
   rerun resumes;
4. writes ``<output_dir>/model`` (see :mod:`pipeline.model.video_llm`), ``<output_dir>/loss.tsv`` and
   ``<output_dir>/train_metrics.json`` (the Trainer's runtime and throughput), then removes the checkpoints, so a
   forced rerun starts afresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from pipeline import configure_logging
from pipeline.data.dataset import InstructionDataset, VideoCollator, fit_records
from pipeline.data.templates import VIDEO_WRAP, get_template, video_wrap_ids
from pipeline.features.store import FeatureStore
from pipeline.io import atomic_path, publish_dir, read_json, read_yaml, write_json, write_table, write_yaml
from pipeline.model.projector import build_projector, projector_weights
from pipeline.model.video_llm import (
    EXTRA_FILE,
    META,
    PROJECTOR_FILE,
    VideoLLM,
    gathered,
    load_llm,
    load_stage,
    save_stage,
)
from pipeline.train.config import StageConfig, stage_model_dir
from pipeline.train.launch import slurm_rank_env

log = logging.getLogger(__name__)

LOSS_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_second"]
PREEMPTED = 143  # the exit code of a process ended by SIGTERM
COMPLETE = "complete"  # the mark of a checkpoint written whole


def _tokenizer(config: StageConfig):
    """The stage's tokenizer: the previous stage's (with any tokens it added) or the base LLM's, with the video
    wrap tokens added when the stage asks for them."""
    if config.init:
        previous = read_json(Path(config.init) / META)
        tokenizer = AutoTokenizer.from_pretrained(previous.get("tokenizer", previous["llm"]))
    else:
        tokenizer = AutoTokenizer.from_pretrained(config.llm)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    base_vocab = len(tokenizer)
    if config.video_start_end and not set(VIDEO_WRAP) <= set(tokenizer.get_vocab()):
        tokenizer.add_special_tokens({"additional_special_tokens": list(VIDEO_WRAP)})
    return tokenizer, base_vocab


def build_model(config: StageConfig, feature_dim: int, tokenizer=None, base_vocab: int | None = None
                ) -> tuple[VideoLLM, dict]:
    """The stage's model with exactly the stage's parameters trainable, and its ``video_llm.json`` metadata.

    Args:
        tokenizer, base_vocab: the stage's tokenizer and its size before added tokens; with more tokens than that,
            the model gets (or keeps) an embedding table for them, initialised to the LLM's mean embedding.

    Raises:
        ValueError: the previous stage's projector expects another feature width than ``feature_dim``.
    """
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    if config.init:
        model, previous = load_stage(config.init, dtype)
        if previous["mm_hidden_size"] != feature_dim:
            raise ValueError(f"{config.init}: mm_projector takes {previous['mm_hidden_size']}-wide features, "
                             f"the features are {feature_dim} wide")
        meta = {key: previous[key] for key in ("llm", "adapters", "mm_projector_type", "mm_hidden_size", "hidden_size")}
        base_vocab = previous.get("base_vocab", base_vocab)
    else:
        llm = load_llm(config.llm, dtype)
        hidden = llm.get_input_embeddings().embedding_dim  # the weight may be ZeRO-3 partitioned
        projector = build_projector(config.mm_projector_type, feature_dim, hidden)
        if config.mm_projector_init:
            _init_projector(projector, config.mm_projector_init)
        projector = projector.to(dtype)
        model = VideoLLM(llm, projector)
        meta = {"llm": config.llm, "adapters": [], "mm_projector_type": config.mm_projector_type,
                "mm_hidden_size": feature_dim, "hidden_size": hidden}
    added = len(tokenizer) - base_vocab if tokenizer is not None and base_vocab is not None else 0
    if added and (model.extra_embeddings is None or model.extra_embeddings.num_embeddings != added):
        weight = model.llm.get_input_embeddings().weight
        with gathered(weight):
            mean = weight.detach().float().mean(0)
        model.extra_embeddings = nn.Embedding.from_pretrained(mean.repeat(added, 1).to(dtype), freeze=False)
        model.base_vocab = base_vocab
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(config.train_mm_projector)
    if model.extra_embeddings is not None:
        model.extra_embeddings.requires_grad_(config.train_mm_projector)
        meta.update(extra_embeddings=str(stage_model_dir(config) / EXTRA_FILE), base_vocab=model.base_vocab,
                    tokenizer=str(stage_model_dir(config) / "tokenizer"))
    if config.llm_training == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        model.llm = get_peft_model(model.llm, LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ))
        meta["adapters"] = meta["adapters"] + [str(stage_model_dir(config) / "adapter")]
    elif config.llm_training == "full":
        model.llm.requires_grad_(True)
        meta["llm"], meta["adapters"] = str(stage_model_dir(config) / "llm"), []  # saved with earlier adapters merged
    meta.update(stage=config.name, llm_training=config.llm_training, template=config.template,
                video_start_end=config.video_start_end, max_frames=config.max_frames)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("stage %s: %.3f M of %.1f M parameters train (projector %s, LLM %s, added tokens %d)", config.name,
             trainable / 1e6, total / 1e6, config.train_mm_projector, config.llm_training, added)
    return model, meta


def _init_projector(projector: nn.Module, source: str) -> None:
    """Load ``mm_projector`` weights from a LLaVA checkpoint into a new projector.

    Raises:
        ValueError: the checkpoint's projector has other names or shapes (another type, feature or LLM width).
    """
    weights = projector_weights(source)
    expected = {name: tuple(p.shape) for name, p in projector.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        raise ValueError(f"mm_projector_init {source}: its mm_projector {found} does not fit this stage's {expected}")
    projector.load_state_dict(weights)
    log.info("mm_projector initialised from %s", source)


class VideoLLMTrainer(Trainer):
    """The HF Trainer, saving and loading checkpoints in the stage's model-folder format (only what trains).

    Args:
        stage_meta: the ``video_llm.json`` content of the stage (:func:`build_model`).
    """

    def __init__(self, *args, stage_meta: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_meta = stage_meta
        self._tokens, self._since = 0, time.perf_counter()

    def compute_loss(self, model, inputs, *args, **kwargs):
        # this step's tokens, video positions included; summed on the device, read only when logging (no sync)
        self._tokens = self._tokens + inputs["attention_mask"].sum()
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds ``tokens_per_second`` (non-padding tokens of all processes per second since the last loss log)."""
        if "loss" in logs:
            now = time.perf_counter()
            tokens = int(self._tokens) * self.args.world_size
            logs["tokens_per_second"] = round(tokens / max(now - self._since, 1e-9), 1)
            self._tokens, self._since = 0, now
        super().log(logs, *args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_stage(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                       self.stage_meta, self.processing_class, state_dict)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        folder = Path(resume_from_checkpoint)
        model.mm_projector.load_state_dict(safetensors.torch.load_file(folder / PROJECTOR_FILE))
        if model.extra_embeddings is not None:
            model.extra_embeddings.load_state_dict(safetensors.torch.load_file(folder / EXTRA_FILE))
        if self.stage_meta["llm_training"] == "lora":
            from peft import set_peft_model_state_dict

            adapter = safetensors.torch.load_file(folder / "adapter" / "adapter_model.safetensors")
            set_peft_model_state_dict(model.llm, adapter)
        elif self.stage_meta["llm_training"] == "full":
            for shard in sorted((folder / "llm").glob("*.safetensors")):  # tied weights are saved once
                model.llm.load_state_dict(safetensors.torch.load_file(shard), strict=False)
        log.info("resumed weights from %s", folder)


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
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        extra["accelerator_config"] = {"use_configured_state": True}
    return extra


def _latest_checkpoint(folder: Path, config: StageConfig, clean: bool) -> str | None:
    """The newest complete checkpoint in ``folder`` if it was made with the same settings, else None.

    Every rank computes the same answer; the rank with ``clean`` removes stale checkpoints and those a kill left
    half-written, and stamps the folder with the current settings.
    """
    stamp = folder / "stage.yaml"
    stale = folder.exists() and (not stamp.exists() or read_yaml(stamp) != config.to_dict())
    found = [] if stale else sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [path for path in found if (path / COMPLETE).exists()]
    if clean:
        if stale:
            log.warning("%s: checkpoints made with other settings, starting afresh", folder)
            shutil.rmtree(folder)
        for path in set(found) - set(complete):
            log.warning("%s: written only in part (killed while saving), removed", path)
            shutil.rmtree(path)
        folder.mkdir(parents=True, exist_ok=True)
        write_yaml(stamp, config.to_dict())
    return str(complete[-1]) if complete else None


def training_arguments(config: StageConfig, output_dir: Path, extra: dict) -> TrainingArguments:
    """The HF ``TrainingArguments`` of a stage (made before the model: under ZeRO-3 they shard its loading)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        weight_decay=config.weight_decay,
        bf16=config.bf16,
        gradient_checkpointing=config.gradient_checkpointing,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=2,  # the newest complete checkpoint survives while the next one is written
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=["tensorboard"],
        deepspeed=config.deepspeed,
        disable_tqdm=True,
        **extra,
    )


def run_stage(config: StageConfig) -> bool:
    """Train one stage and write its outputs (see the module docstring).

    Returns:
        False when the stage stopped on SIGTERM (a checkpoint was saved; the model was not written).
    """
    extra = _prepare_distributed(config)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "tensorboard"))
    args = training_arguments(config, checkpoints, extra)
    records = read_json(config.train_data)
    if not records:
        raise ValueError(f"{config.train_data}: no training records")
    store = FeatureStore(config.features_index)
    tokenizer, base_vocab = _tokenizer(config)
    template = get_template(config.template)
    wrap = video_wrap_ids(tokenizer, config.video_start_end)
    rows = {video: store.rows(video, config.max_frames) for video in {r["video"] for r in records} if video in store}
    records, excluded = fit_records(records, tokenizer, template, config.max_length, rows, wrap)
    if excluded:
        log.warning("stage %s: %d of %d records excluded (listed in model/excluded.jsonl), e.g. %s", config.name,
                    len(excluded), len(records) + len(excluded), excluded[0]["reason"])
    if not records:
        raise ValueError(f"{config.train_data}: no record fits max_length {config.max_length}")
    dataset = InstructionDataset(records, tokenizer, template, store, config.max_length, wrap, config.max_frames)
    model, meta = build_model(config, store.get(records[0]["video"]).shape[1], tokenizer, base_vocab)
    resume = _latest_checkpoint(checkpoints, config, clean=args.process_index == 0)
    collator = VideoCollator(tokenizer.pad_token_id, trace=out / "batches.log" if config.trace_batches else None)
    preemption = Preemption()
    trainer = VideoLLMTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=collator, stage_meta=meta,
                              callbacks=[CheckpointComplete(), preemption])
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
    final = stage_model_dir(config)
    tmp = final.with_name(final.name + ".tmp")
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.save_model(str(tmp))  # every rank: under ZeRO-3 the weights are gathered first
    if trainer.is_world_process_zero():
        write_yaml(tmp / "stage.yaml", config.to_dict())
        with atomic_path(tmp / "excluded.jsonl") as path:  # the records this stage could not train on, and why
            path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in excluded), encoding="utf-8")
        publish_dir(tmp, final)
        rows = [{key: entry.get(key, "") for key in LOSS_COLUMNS} for entry in trainer.state.log_history
                if "loss" in entry]
        write_table(out / "loss.tsv", rows, LOSS_COLUMNS)
        write_json(out / "train_metrics.json", metrics)  # runtime (s), samples and steps per second of this run
        shutil.rmtree(checkpoints, ignore_errors=True)
        log.info("stage %s done: %s, %d loss rows", config.name, final, len(rows))
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train.stage --config STAGE.yaml``: one process of a training stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the stage's resolved settings (stage.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    parser.add_argument("--ranks-from-slurm", action="store_true",
                        help="one task of an srun step (pipeline.train.launch): rank and rendezvous from SLURM")
    args = parser.parse_args(argv)
    if args.ranks_from_slurm:
        os.environ.update(slurm_rank_env(dict(os.environ)))
    try:
        finished = run_stage(StageConfig.from_dict(read_yaml(args.config)))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0 if finished else PREEMPTED


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
