"""Interrupted stages resume where they stopped, with the same data order; DeepSpeed ZeRO-2 and ZeRO-3 on two CPU
processes (gloo), and without DeepSpeed. Resuming loads no pickle beyond tensors and allow-listed types: a
checkpoint file holding a malicious pickle is refused, not executed."""

import os
import signal
import time

import pytest
import safetensors.torch
import torch
from conftest import REPO, run_stage_process, stage_settings

from pipeline.io import read_table
from pipeline.model.checkpoint import load_stage

LORA = {"llm_training": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


def _settings(root, tiny_llm_dir, train_data, name, **changes):
    # 12 records at batch 2: 6 steps an epoch, 12 in all, a checkpoint every 3
    return stage_settings(root, tiny_llm_dir, train_data, name, batch_size=2, save_steps=3, trace_batches=True,
                          learning_rate=5e-3, **LORA, **changes)


class _Payload:
    """Unpickled without ``weights_only``, it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _refuses_a_malicious_checkpoint(root, config, target, processes=1):
    """Replace the checkpoint file ``target`` with a malicious pickle, rerun the stage and check that it fails
    without running the pickle; then put the file back."""
    marker = root / "executed"
    original = target.read_bytes()
    torch.save(_Payload(marker), target)
    done = run_stage_process(root, config, processes=processes)
    target.write_bytes(original)
    assert done.returncode != 0 and "Weights only load failed" in done.stderr, done.stderr[-3000:]
    assert not marker.exists()


def _wait_for(path_glob, job, timeout=300):
    deadline = time.monotonic() + timeout
    while not list(path_glob()):
        assert job.poll() is None, f"the stage ended early: {job.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_llm_dir, train_data):
    """An uninterrupted run: its batches, losses and weights."""
    root = tmp_path_factory.mktemp("reference")
    done = run_stage_process(root, _settings(root, tiny_llm_dir, train_data, "stage"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "stage"


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_an_interrupted_stage_resumes_from_its_checkpoint_with_the_same_data_order(
        tmp_path, tiny_llm_dir, train_data, reference, how):
    config = _settings(tmp_path, tiny_llm_dir, train_data, "stage")
    out = tmp_path / "stage"
    job = run_stage_process(tmp_path, config, wait=False)
    _wait_for(lambda: (out / "checkpoints").glob("checkpoint-3/complete"), job)
    if how == "SIGKILL":  # as a node failure: every process, no warning
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    else:  # as SLURM's preemption (scancel --signal=TERM): the stage saves a checkpoint and exits 143
        os.kill(job.pid, signal.SIGTERM)
        assert job.wait(timeout=300) == 143, job.stderr.read()[-3000:]
        assert "stopped on SIGTERM" in job.stderr.read()
    assert not (out / "model").exists()
    saved = max(int(p.parent.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*/complete"))
    first_run = (out / "batches.log").read_text().splitlines()
    (out / "batches.log").unlink()

    done = run_stage_process(tmp_path, config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'checkpoint-{saved}'}" in done.stderr
    expected = (reference / "batches.log").read_text().splitlines()
    assert first_run[:saved] == expected[:saved]
    assert (out / "batches.log").read_text().splitlines() == expected[saved:]  # continues with the same order
    losses = read_table(out / "loss.tsv")
    assert list(losses["step"]) == [str(step) for step in range(1, 13)]
    assert not (out / "checkpoints").exists()
    resumed, _ = load_stage(out / "model")
    uninterrupted, _ = load_stage(reference / "model")
    for (name, a), (_, b) in zip(resumed.named_parameters(), uninterrupted.named_parameters()):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("zero, llm", [("zero2", "frozen"), ("zero3", "lora")])
def test_deepspeed_on_two_cpu_processes_resumes_after_preemption(tmp_path, tiny_llm_dir, train_data, zero, llm):
    changes = LORA if llm == "lora" else {"llm_training": "frozen"}
    # 12 records, 2 per process and step: 3 steps an epoch, 12 in all, a checkpoint every 2
    config = stage_settings(tmp_path, tiny_llm_dir, train_data, "stage", batch_size=2, epochs=4, save_steps=2,
                            deepspeed=str(REPO / f"config/deepspeed/{zero}.json"), **changes)
    out = tmp_path / "stage"
    job = run_stage_process(tmp_path, config, processes=2, wait=False)
    _wait_for(lambda: (out / "checkpoints").glob("checkpoint-*/complete"), job)
    os.killpg(job.pid, signal.SIGTERM)  # as scancel --signal=TERM: every process of the step
    job.wait(timeout=300)
    first = job.stderr.read()
    assert job.returncode != 0 and "stopped on SIGTERM" in first, first[-3000:]
    assert f"DeepSpeed ZeRO-{zero[-1]}" in first and "2 process(es)" in first
    assert not (out / "model").exists()
    newest = max((out / "checkpoints").glob("checkpoint-*/complete"), key=lambda p: int(p.parent.name.split("-")[1]))
    # DeepSpeed's own torch.load(weights_only=False): the model states all ranks read, one rank's optimizer states
    target = "mp_rank_00_model_states.pt" if zero == "zero2" else "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    _refuses_a_malicious_checkpoint(tmp_path, config, next(newest.parent.glob(f"global_step*/{target}")), processes=2)

    done = run_stage_process(tmp_path, config, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert list(read_table(out / "loss.tsv")["step"])[-1] == "12"
    projector = safetensors.torch.load_file(out / "model" / "mm_projector.safetensors")
    assert projector["weight"].shape == (32, 8)  # whole (ZeRO-3 gathers the partitioned weights before saving)
    model, meta = load_stage(out / "model")
    assert meta["llm_training"] == llm
    if llm == "lora":
        adapter = safetensors.torch.load_file(out / "model" / "adapters" / "0_stage" / "adapter_model.safetensors")
        assert all(t.numel() > 0 for t in adapter.values()) and any(t.abs().sum() > 0 for k, t in adapter.items()
                                                                     if "lora_B" in k)


def test_a_stage_without_deepspeed_resumes_and_refuses_a_malicious_checkpoint(tmp_path, tiny_llm_dir, train_data):
    """Video-ChatGPT's recipe runs without DeepSpeed: the Trainer's own optimizer, scheduler and rng files."""
    config = _settings(tmp_path, tiny_llm_dir, train_data, "stage", deepspeed=None)
    out = tmp_path / "stage"
    job = run_stage_process(tmp_path, config, wait=False)
    _wait_for(lambda: (out / "checkpoints").glob("checkpoint-3/complete"), job)
    os.kill(job.pid, signal.SIGTERM)
    assert job.wait(timeout=300) == 143, job.stderr.read()[-3000:]
    checkpoint = max((out / "checkpoints").glob("checkpoint-*/complete"), key=lambda p: int(p.parent.name[11:])).parent
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in checkpoint.iterdir()}
    _refuses_a_malicious_checkpoint(tmp_path, config, checkpoint / "rng_state.pth")

    done = run_stage_process(tmp_path, config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {checkpoint}" in done.stderr and "no DeepSpeed" in done.stderr
    assert list(read_table(out / "loss.tsv")["step"]) == [str(step) for step in range(1, 13)]
