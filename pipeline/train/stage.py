"""Run one training stage with the Hugging Face Trainer (and DeepSpeed when the stage names a config).

``python -m pipeline.train.stage --config results/train/<stage>/stage.yaml`` is what every process of a stage runs;
:mod:`pipeline.train.launch` starts one per GPU (or one on the CPU). The stage:

1. builds the model: the base LLM and a new ``mm_projector``, or the previous stage's model folder (its adapters
   merged); then freezes everything and unfreezes what the stage trains (projector, LoRA adapters, or the LLM);
2. trains on the instruction records with their cached features, checkpointing every ``save_steps`` to
   ``<output_dir>/checkpoints`` and resuming from the newest checkpoint made with the same settings;
3. writes ``<output_dir>/model`` (see :mod:`pipeline.model.video_llm`) and ``<output_dir>/loss.tsv``, then
   removes the checkpoints, so a forced rerun starts afresh.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path

import safetensors.torch
import torch
from transformers import AutoTokenizer, Trainer, TrainingArguments

from pipeline import configure_logging
from pipeline.data.dataset import InstructionDataset, VideoCollator, fit_records
from pipeline.data.templates import get_template
from pipeline.features.store import FeatureStore
from pipeline.io import atomic_path, publish_dir, read_json, read_yaml, write_table, write_yaml
from pipeline.model.projector import build_projector
from pipeline.model.video_llm import META, PROJECTOR_FILE, VideoLLM, load_llm, load_stage, save_stage
from pipeline.train.config import StageConfig, stage_model_dir

log = logging.getLogger(__name__)

LOSS_COLUMNS = ["step", "epoch", "loss", "learning_rate", "grad_norm"]


def build_model(config: StageConfig, feature_dim: int) -> tuple[VideoLLM, dict]:
    """The stage's model with exactly the stage's parameters trainable, and its ``video_llm.json`` metadata.

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
    else:
        llm = load_llm(config.llm, dtype)
        hidden = llm.get_input_embeddings().weight.shape[1]
        projector = build_projector(config.mm_projector_type, feature_dim, hidden).to(dtype)
        model = VideoLLM(llm, projector)
        meta = {"llm": config.llm, "adapters": [], "mm_projector_type": config.mm_projector_type,
                "mm_hidden_size": feature_dim, "hidden_size": hidden}
    model.requires_grad_(False)
    model.mm_projector.requires_grad_(config.train_mm_projector)
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
    meta.update(stage=config.name, llm_training=config.llm_training, template=config.template)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("stage %s: %.3f M of %.1f M parameters train (projector %s, LLM %s)", config.name, trainable / 1e6,
             total / 1e6, config.train_mm_projector, config.llm_training)
    return model, meta


class VideoLLMTrainer(Trainer):
    """The HF Trainer, saving and loading checkpoints in the stage's model-folder format (only what trains).

    Args:
        stage_meta: the ``video_llm.json`` content of the stage (:func:`build_model`).
    """

    def __init__(self, *args, stage_meta: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_meta = stage_meta

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_stage(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                       self.stage_meta, self.processing_class)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        folder = Path(resume_from_checkpoint)
        model.mm_projector.load_state_dict(safetensors.torch.load_file(folder / PROJECTOR_FILE))
        if self.stage_meta["llm_training"] == "lora":
            from peft import set_peft_model_state_dict

            adapter = safetensors.torch.load_file(folder / "adapter" / "adapter_model.safetensors")
            set_peft_model_state_dict(model.llm, adapter)
        elif self.stage_meta["llm_training"] == "full":
            for shard in sorted((folder / "llm").glob("*.safetensors")):  # tied weights are saved once
                model.llm.load_state_dict(safetensors.torch.load_file(shard), strict=False)
        log.info("resumed weights from %s", folder)


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
    """The newest checkpoint in ``folder`` if it was made with the same settings, else None.

    Every rank computes the same answer; the rank with ``clean`` removes stale checkpoints and stamps the folder
    with the current settings.
    """
    stamp = folder / "stage.yaml"
    stale = folder.exists() and (not stamp.exists() or read_yaml(stamp) != config.to_dict())
    checkpoints = [] if stale else sorted(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if clean:
        if stale:
            log.warning("%s: checkpoints made with other settings, starting afresh", folder)
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_yaml(stamp, config.to_dict())
    return str(checkpoints[-1]) if checkpoints else None


def run_stage(config: StageConfig) -> None:
    """Train one stage and write its outputs (see the module docstring)."""
    extra = _prepare_distributed(config)
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    records = read_json(config.train_data)
    if not records:
        raise ValueError(f"{config.train_data}: no training records")
    store = FeatureStore(config.features_index)
    tokenizer = AutoTokenizer.from_pretrained(read_json(Path(config.init) / META)["llm"] if config.init else config.llm)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    template = get_template(config.template)
    records, excluded = fit_records(records, tokenizer, template, config.max_length, store.tokens)
    if excluded:
        log.warning("stage %s: %d of %d records excluded (listed in model/excluded.jsonl), e.g. %s", config.name,
                    len(excluded), len(records) + len(excluded), excluded[0]["reason"])
    if not records:
        raise ValueError(f"{config.train_data}: no record fits max_length {config.max_length}")
    dataset = InstructionDataset(records, tokenizer, template, store, config.max_length)
    model, meta = build_model(config, feature_dim=store.get(records[0]["video"]).shape[1])

    args = TrainingArguments(
        output_dir=str(checkpoints),
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
        save_total_limit=1,
        logging_steps=config.logging_steps,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.dataloader_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to="none",
        deepspeed=config.deepspeed,
        disable_tqdm=True,
        **extra,
    )
    resume = _latest_checkpoint(checkpoints, config, clean=args.process_index == 0)
    trainer = VideoLLMTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              data_collator=VideoCollator(tokenizer.pad_token_id), stage_meta=meta)
    plugin = trainer.accelerator.state.deepspeed_plugin
    log.info("stage %s: %s, %d process(es) on %s", config.name,
             f"DeepSpeed ZeRO-{plugin.zero_stage} ({config.deepspeed})" if plugin else "no DeepSpeed",
             args.world_size, args.device)
    if resume:
        log.info("resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)

    if trainer.is_world_process_zero():
        final = stage_model_dir(config)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_stage(trainer.accelerator.unwrap_model(trainer.model), tmp, meta, tokenizer)
        write_yaml(tmp / "stage.yaml", config.to_dict())
        with atomic_path(tmp / "excluded.jsonl") as path:  # the records this stage could not train on, and why
            path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in excluded), encoding="utf-8")
        publish_dir(tmp, final)
        rows = [{key: entry.get(key, "") for key in LOSS_COLUMNS} for entry in trainer.state.log_history
                if "loss" in entry]
        write_table(out / "loss.tsv", rows, LOSS_COLUMNS)
        shutil.rmtree(checkpoints, ignore_errors=True)
        log.info("stage %s done: %s, %d loss rows", config.name, final, len(rows))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train.stage --config STAGE.yaml``: one process of a training stage."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the stage's resolved settings (stage.yaml)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher; unused")
    args = parser.parse_args(argv)
    try:
        run_stage(StageConfig.from_dict(read_yaml(args.config)))
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
