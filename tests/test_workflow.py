"""The whole workflow through Snakemake, on real clips with tiny models of the real families."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, TINY_CLIP, copy_workflow

from pipeline.io import read_json, read_table, write_table
from pipeline.shards import MANIFEST_COLUMNS


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "2", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def planned_jobs(done: subprocess.CompletedProcess) -> dict[str, int]:
    """The job counts of a dry run's 'Job stats' table."""
    table = done.stdout.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture(scope="module")
def run(tmp_path_factory, clips, tiny_llm_dir):
    """A complete run: a 5 s segment of the band webm, the carphone mp4, and a text file named .mp4."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    fake = workdir / "fake.mp4"
    fake.write_bytes(clips["text"].read_bytes())
    write_table(workdir / "manifest.tsv", [
        {"video_id": "band", "source": clips["webm"].as_uri(), "start": 10, "end": 15},
        {"video_id": "carphone", "source": str(clips["carphone"])},
        {"video_id": "fake", "source": str(fake)},
    ], MANIFEST_COLUMNS)
    qa = [{"video_id": "band", "q": q, "a": a} for q, a in [
        ("What instrument is played?", "An electric guitar."), ("Where is this?", "In a studio."),
        ("What is on his head?", "Headphones.")]]
    qa += [{"video_id": "carphone", "q": q, "a": a} for q, a in [
        ("Where is the man?", "In a car."), ("What does he wear?", "A bow tie."), ("What does he do?", "Talks.")]]
    qa += [{"video_id": "fake", "q": "What is this?", "a": "Text."}]
    (workdir / "qa.json").write_text(json.dumps(qa))
    stage = {"train": {"mm_projector": True, "llm": "frozen"}, "epochs": 1, "batch_size": 2, "max_length": 64,
             "learning_rate": 1e-3, "deepspeed": str(REPO / "config/deepspeed/zero2.json"),
             "resources": {"cpus": 2}}
    config = {
        "data": {"manifest": "manifest.tsv", "shard_size": 2},
        "features": TINY_CLIP,
        "instructions": {"datasets": [{"name": "clips", "format": "videochatgpt_qa", "annotations": "qa.json"}],
                         "val_fraction": 0.5},
        "llm": {"name_or_path": str(tiny_llm_dir), "gguf": None, "template": "chatml"},
        "stages": [
            {"name": "stage1", "init": None, **stage},
            {"name": "stage2", "init": "stage1", **stage, "train": {"mm_projector": True, "llm": "lora"},
             "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
        ],
        "evaluate": {"max_new_tokens": 4},
    }
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    return workdir


def test_every_stage_writes_its_outputs(run):
    results = run / "results"
    for path in ("train/stage1/model/mm_projector.safetensors", "train/stage2/model/adapter/adapter_config.json",
                 "eval/predictions.jsonl", "report/summary.html", "report/loss_stage1.svg", "report/loss_stage2.svg",
                 "report/rulegraph.svg", "report/dag.svg", "report/video_stats.svg", "features/index.tsv"):
        assert (results / path).is_file(), path
    assert read_json(results / "eval" / "metrics.json")["count"] == 3
    assert sorted(read_table(results / "features" / "index.tsv")["video_id"]) == ["band", "carphone"]
    assert "shard: shard&#45;00001" in (results / "report" / "dag.svg").read_text()  # the DAG shows every shard


def test_a_text_file_named_mp4_costs_only_its_own_row(run):
    status = read_table(run / "results" / "transcode" / "shard-00001.tsv")
    assert list(status["status"]) == ["failed"]
    assert "moov atom not found" in status["reason"][0]
    counts = read_json(run / "results" / "instructions" / "clips" / "counts.json")
    assert (counts["kept"], counts["rejected_by_reason"]) == (6, {"no features": 1})
    summary = (run / "results" / "report" / "summary.html").read_text()
    assert "fake" in summary and "moov atom not found" in summary
    assert "<td>transcode</td>\n      <td>libav</td>\n      <td>1</td>" in summary  # failures by reason


def test_a_complete_run_has_nothing_left_to_do(run):
    assert "Nothing to be done" in snakemake(run, "-n").stdout


def test_forcerun_a_stage_redoes_that_stage_and_what_follows_only(run):
    jobs = planned_jobs(snakemake(run, "-n", "--forcerun", "train_stage2"))
    assert jobs == {"train_stage2": 1, "evaluate": 1, "loss_plot": 1, "summary": 1, "all": 1}


def test_deleting_one_shards_videos_redoes_that_shard_only(run):
    subprocess.run(["rm", "-r", str(run / "results" / "compress" / "shard-00000")], check=True)
    jobs = planned_jobs(snakemake(run, "-n"))
    assert jobs["compress"] == 1 and jobs["features"] == 1
    assert "transcode" not in jobs and "download" not in jobs
    assert {"train_stage1", "train_stage2", "evaluate"} <= set(jobs)


def test_report(run):
    snakemake(run, "--report", "results/report.html")
    assert (run / "results" / "report.html").stat().st_size > 10_000


@pytest.mark.parametrize("change, named", [
    ({"features": {"modle": "ViT-L-14"}}, "modle"),
    ({"data": {"shard_size": "many"}}, "shard_size"),
    ({"stages": [{"name": "s", "train": {"mm_projector": True, "llm": "partly"}}]}, "partly"),
])
def test_a_wrong_config_key_or_type_stops_before_any_job(repo_copy, change, named):
    (repo_copy / "bad.yaml").write_text(yaml.safe_dump(change))
    done = snakemake(repo_copy, "-n", "--configfile", "bad.yaml", check=False)
    assert done.returncode != 0
    assert named in done.stdout + done.stderr and "validating config" in done.stdout + done.stderr
    assert not (repo_copy / "results").exists()


def test_single_pass_compresses_the_downloads_without_transcoding(run):
    config = yaml.safe_load((run / "config" / "config.yaml").read_text())
    config["compress"] = {"single_pass": True}
    (run / "single.yaml").write_text(yaml.safe_dump(config))
    snakemake(run, "--configfile", "single.yaml", "--directory", str(run), "--forcerun", "compress",
              "results/features/index.tsv")
    status = read_table(run / "results" / "compress" / "shard-00000.tsv")
    assert list(status["video_id"]) == ["band", "carphone"]
    assert [float(d) for d in status["duration"]] == pytest.approx([5.0, 4.33], abs=0.01)  # cut here, at 3 fps
    fake = read_table(run / "results" / "compress" / "shard-00001.tsv")
    assert "moov atom not found" in fake["reason"][0]
