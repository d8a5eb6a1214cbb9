"""benchmarks/gpu/run.sh --tiny: the prepared GPU benchmark's every path on the CPU, and every section of its
JSON and Markdown."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tiny_run_writes_every_section(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--tiny"], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable,
                                                               "OUT": str(tmp_path)})
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 60, f"--tiny took {seconds:.0f} s"
    result = json.loads((tmp_path / "gpu_benchmark.json").read_text())
    assert result["mode"] == "tiny"
    assert {"device", "torch", "cuda"} <= set(result["environment"])
    features = result["features"]
    assert "error" not in features, features
    assert set(features["runs"]) == {"ours", "ours_without_tower_build", "videochatgpt_loop", "encoder_ceiling"}
    assert features["frames"] == 2 * 12 and all(run["frames_per_s"] > 0 for run in features["runs"].values())
    training = result["training"]
    assert training["packing"] == "available"  # pipeline.train.config.StageConfig has packing
    assert {(r["llm_training"], r["attention"], r["batches"]) for r in training["runs"]} == {
        (llm, "sdpa", batches) for llm in ("lora", "full") for batches in ("padded", "packed")}
    for run in training["runs"]:
        assert "error" not in run, run
        assert run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1 and run["peak_memory_gib"] is None
    lora, full = (next(r for r in training["runs"] if r["llm_training"] == kind and r["batches"] == "padded")
                  for kind in ("lora", "full"))
    assert lora["trainable_parameters"] < full["trainable_parameters"]
    assert lora["linear_parameters"] == full["linear_parameters"]
    memory = result["memory"]["runs"]
    assert [(r["video_tokens"], r["activation_checkpointing"]) for r in memory] == [
        (36, False), (36, True), (96, False), (96, True)]
    assert all("error" not in r for r in memory), memory
    table = (tmp_path / "gpu_benchmark.md").read_text()
    for heading in ("## Features", "## Training", "## Memory of the LoRA step", "Device: "):
        assert heading in table
    assert "| ours |" in table and "| lora | sdpa | packed |" in table and "| 96 | True |" in table
