import subprocess
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import run_stage_process, stage_settings

from pipeline.eval.generate import evaluate
from pipeline.io import read_json, read_table
from pipeline.model.video_llm import load_llm, load_stage
from pipeline.train.config import StageConfig, resolve_stage
from pipeline.train.launch import build_command, rendezvous_port, slurm_rank_env, slurm_resources
from pipeline.train.stage import _latest_checkpoint, build_model


def _run_stage(root, tiny_llm_dir, data, name, **settings):
    config = stage_settings(root, tiny_llm_dir, data, name, **settings)
    done = run_stage_process(root, config)
    assert done.returncode == 0, done.stderr[-3000:]
    return StageConfig.from_dict(config), done.stderr


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_llm_dir, train_data):
    data = train_data
    """Stage 1 (projector only) then stage 2 (projector + LoRA, from stage 1), each a real DeepSpeed ZeRO-2 run."""
    root = tmp_path_factory.mktemp("train")
    first, log1 = _run_stage(root, tiny_llm_dir, data, "stage1")
    second, _ = _run_stage(root, tiny_llm_dir, data, "stage2", init=str(root / "stage1" / "model"),
                           llm_training="lora", lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                                      "target_modules": ["q_proj", "v_proj"]})
    return root, first, second, log1


def test_stage_outputs_and_logs(stages):
    root, first, second, log1 = stages
    assert "stage stage1: DeepSpeed ZeRO-2" in log1
    model1 = root / "stage1" / "model"
    assert sorted(p.name for p in model1.iterdir()) == ["excluded.jsonl", "mm_projector.safetensors", "stage.yaml",
                                                         "video_llm.json"]
    assert sorted(p.name for p in (root / "stage2" / "model").iterdir()) == [
        "adapter", "excluded.jsonl", "mm_projector.safetensors", "stage.yaml", "video_llm.json"]
    assert (model1 / "excluded.jsonl").read_text() == ""
    loss = read_table(root / "stage1" / "loss.tsv")
    assert len(loss) == 6 and list(loss.columns) == ["step", "epoch", "loss", "learning_rate", "grad_norm",
                                                     "tokens_per_second"]
    assert (loss["tokens_per_second"].astype(float) > 0).all()
    assert list((root / "stage1" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (root / "stage1" / "checkpoints").exists()  # resume state goes once the stage is complete
    meta = read_json(root / "stage2" / "model" / "video_llm.json")
    assert meta["adapters"] == [str(root / "stage2" / "model" / "adapter")] and meta["llm_training"] == "lora"


def test_stage1_trains_the_projector_and_stage2_starts_from_it(stages, tiny_llm_dir):
    root, first = stages[0], stages[1]
    torch.manual_seed(first.seed)  # as run_stage does before building the model
    initial = build_model(first, feature_dim=8)[0].mm_projector.state_dict()
    trained1 = safetensors.torch.load_file(root / "stage1" / "model" / "mm_projector.safetensors")
    assert not torch.allclose(trained1["weight"], initial["weight"])
    model2, _ = load_stage(root / "stage2" / "model")
    base = load_llm(str(tiny_llm_dir), torch.float32)
    merged = dict(model2.llm.named_parameters())
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, merged[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # LoRA merged into q/v only
    trained2 = safetensors.torch.load_file(root / "stage2" / "model" / "mm_projector.safetensors")
    assert not torch.allclose(trained2["weight"], trained1["weight"])


def test_evaluate_writes_predictions_and_metrics(stages, train_data, tmp_path):
    data = train_data
    root = stages[0]
    metrics = evaluate(root / "stage2" / "model", [data / "train.json"], data / "index.tsv", tmp_path,
                       max_new_tokens=4)
    assert metrics["count"] == 12 and 0 <= metrics["token_f1"] <= 1
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and read_json(tmp_path / "metrics.json")["count"] == 12


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path):
    config = StageConfig(name="s", llm="x", template="chatml", train_data="t", features_index="i", output_dir="o")
    folder = tmp_path / "checkpoints"
    assert _latest_checkpoint(folder, config, clean=True) is None
    for step in (2, 10, 12):
        (folder / f"checkpoint-{step}").mkdir()
        if step != 12:  # checkpoint-12: killed while being written
            (folder / f"checkpoint-{step}" / "complete").touch()
    assert _latest_checkpoint(folder, config, clean=False).endswith("checkpoint-10")
    assert _latest_checkpoint(folder, config, clean=True).endswith("checkpoint-10")
    assert not (folder / "checkpoint-12").exists()
    changed = StageConfig(**{**config.to_dict(), "learning_rate": 1.0})
    assert _latest_checkpoint(folder, changed, clean=True) is None
    assert not (folder / "checkpoint-10").exists()


def test_launch_commands():
    stage = ["py", "-m", "pipeline.train.stage", "--config", "s.yaml"]
    assert build_command("s.yaml", 0, 1, python="py") == stage  # CPU
    assert build_command("s.yaml", 1, 1, python="py", in_slurm=True) == stage  # 1 x 1 GPU: already in srun -n1
    assert build_command("s.yaml", 8, 1, python="py") == [  # 1 x 8 on a workstation
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", *stage[1:]]
    assert build_command("s.yaml", 8, 4, cpus=64, python="py", in_slurm=True) == [  # 4 x 8: one task per GPU
        "srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--cpus-per-task=8", "--kill-on-bad-exit=1",
        *stage, "--ranks-from-slurm"]
    assert build_command("s.yaml", 0, 1, processes=2, cpus=2, python="py", in_slurm=True) == [  # 2 CPU tasks
        "srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
        *stage, "--ranks-from-slurm"]
    with pytest.raises(ValueError, match="SLURM allocation"):
        build_command("s.yaml", 8, 2)


class _Resources(dict):
    __getattr__ = dict.get


@pytest.mark.parametrize("stage, flags", [
    ({"gpus": 0, "cpus": 2}, ["--ntasks=1", "--cpus-per-task=2"]),  # CPU: the rule runs in srun -n1
    ({"gpus": 1, "cpus": 8}, ["--gres=gpu:1", "--cpus-per-task=8"]),
    ({"gpus": 8, "cpus": 64, "gpu_model": "a100"}, ["--gres=gpu:a100:8", "--ntasks-per-node=8", "--cpus-per-task=8"]),
    ({"gpus": 8, "cpus": 64, "nodes": 4}, ["--nodes=4", "--gres=gpu:8", "--ntasks-per-node=8", "--cpus-per-task=8"]),
    ({"gpus": 1, "cpus": 8, "nodes": 2}, ["--nodes=2", "--gres=gpu:1", "--ntasks-per-gpu=1", "--ntasks=2"]),
    ({"gpus": 0, "cpus": 2, "processes": 2}, ["--ntasks-per-node=2", "--cpus-per-task=1"]),  # gloo
])
def test_training_jobs_ask_slurm_for_one_task_per_gpu_on_every_node(stage, flags):
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    stage = {"nodes": 1, "processes": None, "mem_mb": 64000, "runtime": 600, **stage}
    job = SimpleNamespace(resources=_Resources(slurm_resources(stage)), threads=stage["cpus"])
    params = {"run_uuid": "run", "slurm_logfile": "log", "comment_str": "rule_train_stage1", "account": "",
              "partition": "", "workdir": "."}
    sbatch = (get_submit_command(job, params) + set_gres_string(job)).split()
    for flag in [*flags, "--mem", "64000", "-t", "600", "--requeue", "--signal=TERM@300"]:
        assert flag in sbatch, (flag, sbatch)
    assert not [flag for flag in sbatch if flag.startswith("--gpus")]  # GPUs per node (gres), not per job
    several = stage["gpus"] * stage["nodes"] > 1 or stage["processes"]
    assert ("mpi" in job.resources) == bool(several)  # several processes: the launcher's own srun


def test_ranks_come_from_the_srun_task(monkeypatch):
    env = {"SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "123456"}
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="gpu007\ngpu008\n"))
    assert slurm_rank_env(env) == {"RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8",
                                   "MASTER_ADDR": "gpu007", "MASTER_PORT": str(rendezvous_port("123456"))}
    assert rendezvous_port("123456") != rendezvous_port("123457")


def test_resolve_stage_from_the_workflow_config():
    config = {
        "llm": {"name_or_path": "m", "template": "chatml"}, "model": {"mm_projector_type": "mlp2x_gelu"},
        "stages": [
            {"name": "a", "init": None, "train": {"mm_projector": True, "llm": "frozen"}, "lora": {"r": 2},
             "learning_rate": 1e-3},
            {"name": "b", "init": "a", "train": {"mm_projector": True, "llm": "lora"}, "lora": {"r": 2}},
        ],
    }
    a, b = resolve_stage(config, "a"), resolve_stage(config, "b")
    assert (a["init"], a["lora"], a["learning_rate"], a["mm_projector_type"]) == (None, None, 1e-3, "mlp2x_gelu")
    assert (b["init"], b["lora"], b["output_dir"]) == ("results/train/a/model", {"r": 2}, "results/train/b")
    assert b["train_data"] == "results/train/b/data.json"
    config["stages"][0]["init"] = "b"
    with pytest.raises(ValueError, match=r"stages\[a\].init: 'b' is not an earlier stage"):
        resolve_stage(config, "a")
    with pytest.raises(ValueError, match="nothing trains"):
        StageConfig(name="x", llm="m", template="chatml", train_data="t", features_index="i", output_dir="o",
                    train_mm_projector=False)
