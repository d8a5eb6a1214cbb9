import math
import os
import re
import shutil
import subprocess
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import REPO, run_stage_process, split_stage, stage_settings

from pipeline import VIDEO_TOKEN_INDEX
from pipeline.eval.generate import evaluate
from pipeline.io import read_json, read_table
from pipeline.model.checkpoint import load_stage
from pipeline.model.video_llm import load_llm
from pipeline.train.config import StageConfig, StagePaths, resolve_stage
from pipeline.train.launch import build_command, rendezvous_port, slurm_rank_env, slurm_resources
from pipeline.train.trainer import _latest_checkpoint, _stamp, build_model, stage_tokenizer, training_arguments

UMASK = 0o007  # the stages of the fixture write under it: files 0o660, folders 0o770
STAGE1 = ["chat_template.jinja", "config.json", "excluded.jsonl", "extra_embeddings.safetensors",
          "mm_projector.safetensors", "stage.yaml", "tokenizer.json", "tokenizer_config.json"]


def _run_stage(root, tiny_llm_dir, data, name, **settings):
    config = stage_settings(root, tiny_llm_dir, data, name, **settings)
    done = run_stage_process(root, config)
    assert done.returncode == 0, done.stderr[-3000:]
    return split_stage(config)[0], done.stderr


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_llm_dir, train_data):
    """Stage 1 (projector and the added <vid_start>/<vid_end> embeddings) then stage 2 (projector + LoRA, from
    stage 1), each a real DeepSpeed ZeRO-2 run, given paths relative to their working directory as the workflow
    gives them (the base LLM as ``llm``, a link to the tiny LLM), under umask ``UMASK``."""
    root = tmp_path_factory.mktemp("train")
    (root / "llm").symlink_to(tiny_llm_dir)
    previous = os.umask(UMASK)
    try:
        first, log1 = _run_stage(root, "llm", train_data, "stage1", output_dir="stage1", video_start_end=True)
        second, _ = _run_stage(root, "llm", train_data, "stage2", output_dir="stage2", init="stage1/model",
                               video_start_end=True, llm_training="lora",
                               lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    finally:
        os.umask(previous)
    return root, first, second, log1


def test_stage_outputs_and_logs(stages, tiny_llm_dir):
    root, first, second, log1 = stages
    assert "stage stage1: DeepSpeed ZeRO-2" in log1
    model1, model2 = root / "stage1" / "model", root / "stage2" / "model"
    assert sorted(p.name for p in model1.iterdir()) == STAGE1
    assert sorted(p.name for p in model2.iterdir()) == sorted([*STAGE1, "adapters"])
    assert [p.name for p in (model2 / "adapters").iterdir()] == ["0_stage2"]
    assert (model1 / "excluded.jsonl").read_text() == ""
    loss = read_table(root / "stage1" / "loss.tsv")
    assert len(loss) == 6 and list(loss.columns) == ["step", "epoch", "loss", "learning_rate", "grad_norm",
                                                     "tokens_per_second", "peak_memory_mib"]
    assert (loss["tokens_per_second"].astype(float) > 0).all() and (loss["peak_memory_mib"].astype(float) > 50).all()
    assert list((root / "stage1" / "tensorboard").glob("events.out.tfevents.*"))
    assert not (root / "stage1" / "checkpoints").exists()  # resume state goes once the stage is complete
    meta = read_json(model2 / "config.json")
    assert meta["model_type"] == "video_llm" and meta["llm_training"] == "lora"
    assert (meta["base_llm"], meta["llm"], meta["adapters"]) == (str(tiny_llm_dir), None, ["adapters/0_stage2"])


def test_one_readable_log_line_per_step(stages):
    log1 = stages[3]
    lines = [line for line in log1.splitlines() if " step " in line and " ETA " in line]
    assert len(lines) == 6, log1[-3000:]
    pattern = (r"step (\d)/6 \((\d+)%\), epoch \d\.\d\d: loss \d+\.\d{4}, lr \S+, grad norm \S+, \d+ tokens/s, "
               r"peak memory \d+ MiB, elapsed \d:\d\d:\d\d, ETA \d:\d\d:\d\d$")
    steps = [re.search(pattern, line) for line in lines]
    assert all(steps), lines
    assert [int(m.group(1)) for m in steps] == [1, 2, 3, 4, 5, 6] and steps[2].group(2) == "50"
    assert lines[-1].endswith("ETA 0:00:00")
    assert "{'loss'" not in log1  # the Trainer's dicts are not printed


def test_stage1_trains_the_projector_and_stage2_starts_from_it(stages, tiny_llm_dir):
    root, first = stages[0], stages[1]
    torch.manual_seed(first.seed)  # as run_stage does before building the model
    initial = build_model(first, str(tiny_llm_dir), feature_dim=8)[0].mm_projector.state_dict()
    trained1 = safetensors.torch.load_file(root / "stage1" / "model" / "mm_projector.safetensors")
    assert not torch.allclose(trained1["weight"], initial["weight"])
    model2, _ = load_stage(root / "stage2" / "model")
    base = load_llm(str(tiny_llm_dir), torch.float32)
    merged = dict(model2.llm.named_parameters())
    changed = {n for n, p in base.named_parameters() if not torch.equal(p, merged[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # LoRA merged into q/v only
    trained2 = safetensors.torch.load_file(root / "stage2" / "model" / "mm_projector.safetensors")
    assert not torch.allclose(trained2["weight"], trained1["weight"])


def test_a_zero3_lora_stage_merges_the_adapters_it_starts_from(stages, train_data):
    """A ZeRO-3 stage started from a LoRA stage loads the LLM whole and merges the earlier adapter before DeepSpeed
    partitions it: the merged weights are stage 2's, and stage 3's folder lists both adapters."""
    root = stages[0]
    third, _ = _run_stage(root, "llm", train_data, "stage3", output_dir="stage3", init="stage2/model",
                          video_start_end=True, llm_training="lora", epochs=1,
                          lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                          deepspeed=str(REPO / "config/deepspeed/zero3.json"))
    meta = read_json(root / "stage3" / "model" / "config.json")
    assert meta["adapters"] == ["adapters/0_stage2", "adapters/1_stage3"]
    merged2 = dict(load_stage(root / "stage2" / "model")[0].llm.named_parameters())
    model3, _ = load_stage(root / "stage3" / "model")
    changed = {n for n, p in model3.llm.named_parameters() if not torch.equal(p, merged2[n])}
    assert changed and all(("q_proj" in n or "v_proj" in n) for n in changed)  # only stage 3's LoRA on top


def _logits(folder, tokenizer):
    model, _ = load_stage(folder)
    start, end = tokenizer.convert_tokens_to_ids(["<vid_start>", "<vid_end>"])
    ids = torch.tensor([[start, VIDEO_TOKEN_INDEX, VIDEO_TOKEN_INDEX, end, *tokenizer("What is it?").input_ids]])
    with torch.no_grad():
        return model(ids, video_features=torch.linspace(-1, 1, 16).reshape(2, 8)).logits


def test_a_stage_folder_copied_elsewhere_loads_from_another_directory(stages, tiny_llm_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    root = stages[0]
    tokenizer = AutoTokenizer.from_pretrained(root / "stage2" / "model")  # the stage's own, added tokens included
    assert tokenizer.convert_tokens_to_ids("<vid_start>") == len(tokenizer) - 2
    expected = _logits(root / "stage2" / "model", tokenizer)
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(root / "stage2" / "model", copy)
    adapter = read_json(copy / "adapters" / "0_stage2" / "adapter_config.json")
    assert adapter["base_model_name_or_path"] == str(tiny_llm_dir)  # absolute, not relative to the run's cwd
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    hidden = {name: root / f".{name}" for name in ("stage1", "stage2")}  # nothing may be read from the run's folders
    for name, moved in hidden.items():
        (root / name).rename(moved)
    try:
        assert torch.equal(_logits(copy, AutoTokenizer.from_pretrained(copy)), expected)
    finally:
        for name, moved in hidden.items():
            moved.rename(root / name)


def test_written_files_follow_the_umask(stages):
    root = stages[0]
    modes = {path.relative_to(root): path.stat().st_mode & 0o777
             for stage in ("stage1", "stage2") for path in [root / stage, *(root / stage).rglob("*")]}
    wrong = {str(path): oct(mode) for path, mode in modes.items()
             if mode != (0o770 if (root / path).is_dir() else 0o660)}
    assert not wrong and len(modes) > 20  # safetensors alone writes 0o600


def test_evaluate_writes_predictions_and_metrics(stages, train_data, tmp_path):
    data = train_data
    root = stages[0]
    metrics = evaluate(root / "stage2" / "model", [data / "train.json"], data / "index.tsv", tmp_path,
                       max_new_tokens=4)
    assert metrics["count"] == 12 and 0 <= metrics["token_f1"] <= 1
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 12 and read_json(tmp_path / "metrics.json")["count"] == 12


def _trained_weights(folder):
    weights = {f"mm_projector.{k}": v for k, v in
               safetensors.torch.load_file(folder / "mm_projector.safetensors").items()}
    weights["extra_embeddings.weight"] = safetensors.torch.load_file(folder / "extra_embeddings.safetensors")["weight"]
    for name, value in safetensors.torch.load_file(folder / "adapters" / "0_s" / "adapter_model.safetensors").items():
        weights[name] = value
    return weights


def _initial_weights(config):
    """The trained weights as the stage ``config`` starts them, float32 (as run_stage builds them, from its seed)."""
    settings, paths = split_stage(config)
    torch.manual_seed(settings.seed)
    tokenizer, base_vocab = stage_tokenizer(settings, paths.init)
    model, _ = build_model(settings, paths.init, 8, tokenizer, base_vocab)
    return {name.removeprefix("llm.").replace(".default", ""): p.detach().float()
            for name, p in model.named_parameters() if p.requires_grad}


def test_bf16_mixed_precision_moves_every_trained_weight_at_lr_2e_5(tmp_path, tiny_llm_dir, train_data):
    """Video-ChatGPT's recipe (bf16, no DeepSpeed, lr 2e-5): trained weights stay float32 under bf16 autocast, so
    AdamW moves every one of them (bfloat16 weights would round most updates away); under DeepSpeed ZeRO-2 bf16 the
    engine's float32 masters train and are what is saved. Each trained tensor's movement (about 7e-5 per weight
    over the 6 steps) points as the float32 run's: cosine similarity above 0.98, relative L2 difference below 0.25.
    """
    lora = {"llm_training": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}}
    runs = {"fp32": {"bf16": False, "deepspeed": None}, "bf16": {"bf16": True, "deepspeed": None},
            "bf16_zero2": {"bf16": True}}
    moved, logs = {}, {}
    for name, changes in runs.items():
        config = stage_settings(tmp_path / name, tiny_llm_dir, train_data, "s", learning_rate=2e-5, warmup_ratio=0.0,
                                video_start_end=True, **lora, **changes)
        (tmp_path / name).mkdir()
        done = run_stage_process(tmp_path / name, config)
        assert done.returncode == 0, done.stderr[-3000:]
        initial, final = _initial_weights(config), _trained_weights(tmp_path / name / "s" / "model")
        assert set(initial) == set(final) and len(final) == 7  # mm_projector 2, extra_embeddings, 2 layers x LoRA A, B
        unmoved = {key: float((final[key] == initial[key]).float().mean()) for key in final}
        assert not any(unmoved.values()), (name, unmoved)
        moved[name], logs[name] = {key: final[key] - initial[key] for key in final}, done.stderr
    assert "frozen torch.bfloat16, trained torch.float32" in logs["bf16"]
    assert "frozen torch.bfloat16, trained torch.bfloat16" in logs["bf16_zero2"]  # the engine keeps float32 masters
    for run in ("bf16", "bf16_zero2"):  # measured: cosine >= 0.987, relative L2 error <= 0.16 (mm_projector.bias)
        for key, reference in moved["fp32"].items():
            delta = moved[run][key]
            cosine = torch.nn.functional.cosine_similarity(delta.flatten(), reference.flatten(), dim=0)
            error = (delta - reference).norm() / reference.norm()
            assert cosine > 0.98 and error < 0.25, (run, key, float(cosine), float(error))


def test_the_learning_rate_schedule_warms_up_then_follows_the_scheduler(tmp_path):
    config = StageConfig(name="s", template="chatml", learning_rate=1e-3, warmup_ratio=0.1, lr_scheduler="cosine",
                         deepspeed=None, report_to=[])
    expected = {  # 20 optimizer steps: ceil(0.1 * 20) = 2 of linear warmup, then the schedule over the other 18
        "cosine": lambda s: 1e-3 * s / 2 if s < 2 else 1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18)),
        "linear": lambda s: 1e-3 * s / 2 if s < 2 else 1e-3 * (20 - s) / 18,
        "constant_with_warmup": lambda s: 1e-3 * s / 2 if s < 2 else 1e-3,
        "constant": lambda s: 1e-3,
    }
    from transformers import Trainer

    for scheduler, lr in expected.items():
        args = training_arguments(StageConfig(**{**config.to_dict(), "lr_scheduler": scheduler}), tmp_path,
                                  {"use_cpu": True})
        trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=20)
        seen = []
        for _ in range(21):
            seen.append(trainer.lr_scheduler.get_last_lr()[0])
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
        assert seen == pytest.approx([lr(step) for step in range(21)], abs=1e-12), scheduler


def test_checkpoints_of_other_settings_or_inputs_are_not_resumed(tmp_path):
    config = StageConfig(name="s", template="chatml")
    paths = StagePaths(train_data="t", features_index="i", init="m", output_dir="o")
    folder = tmp_path / "checkpoints"
    assert _latest_checkpoint(folder, _stamp(config, paths), clean=True) is None
    for step in (2, 10, 12):
        (folder / f"checkpoint-{step}").mkdir()
        if step != 12:  # checkpoint-12: killed while being written
            (folder / f"checkpoint-{step}" / "complete").touch()
    assert _latest_checkpoint(folder, _stamp(config, paths), clean=False).endswith("checkpoint-10")
    assert _latest_checkpoint(folder, _stamp(config, paths), clean=True).endswith("checkpoint-10")
    assert not (folder / "checkpoint-12").exists()
    other_data = StagePaths(**{**vars(paths), "train_data": "t2"})
    assert _latest_checkpoint(folder, _stamp(config, other_data), clean=False) is None
    assert _latest_checkpoint(folder, _stamp(config, StagePaths(**{**vars(paths), "output_dir": "elsewhere"})),
                              clean=False).endswith("checkpoint-10")  # where it writes is not what it was made with
    changed = StageConfig(**{**config.to_dict(), "learning_rate": 1.0})
    assert _latest_checkpoint(folder, _stamp(changed, paths), clean=True) is None
    assert not (folder / "checkpoint-10").exists()


STAGE_ARGS = ["--config", "s.yaml", *StagePaths(train_data="d.json", init="results/train/a/model", output_dir="out",
                                                 features_index="i.tsv").argv()]


def test_launch_commands():
    stage = ["py", "-m", "pipeline.train.stage", *STAGE_ARGS]
    assert STAGE_ARGS[2:] == ["--train-data", "d.json", "--init", "results/train/a/model", "--output-dir", "out",
                              "--features-index", "i.tsv"]
    assert build_command(STAGE_ARGS, 0, 1, python="py") == stage  # CPU
    assert build_command(STAGE_ARGS, 1, 1, python="py", in_slurm=True) == stage  # 1 x 1 GPU: already in srun -n1
    assert build_command(STAGE_ARGS, 8, 1, python="py") == [  # 1 x 8 on a workstation
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", *stage[1:]]
    assert build_command(STAGE_ARGS, 8, 4, cpus=64, python="py", in_slurm=True) == [  # 4 x 8: one task per GPU
        "srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--cpus-per-task=8", "--kill-on-bad-exit=1",
        *stage, "--ranks-from-slurm"]
    assert build_command(STAGE_ARGS, 0, 1, processes=2, cpus=2, python="py", in_slurm=True) == [  # 2 CPU tasks
        "srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
        *stage, "--ranks-from-slurm"]
    with pytest.raises(ValueError, match="SLURM allocation"):
        build_command(STAGE_ARGS, 8, 2)


def test_torchrun_passes_every_stage_option_on_to_the_stage():
    """torchrun's parser takes an option that abbreviates one of its own (``--start`` for ``--start-method``)."""
    from torch.distributed.run import get_args_parser

    command = build_command(STAGE_ARGS, 2, 1, python="py")
    parsed = get_args_parser().parse_args(command[3:])
    assert (parsed.module, parsed.training_script, parsed.training_script_args) == (
        True, "pipeline.train.stage", STAGE_ARGS)


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


def test_resolve_stage_gives_settings_and_no_paths():
    config = {
        "llm": {"name_or_path": "m", "template": "chatml"}, "model": {"mm_projector_type": "mlp2x_gelu"},
        "stages": [
            {"name": "a", "init": None, "train": {"connector": "full", "llm": "frozen"}, "lora": {"r": 2},
             "learning_rate": 1e-3},
            {"name": "b", "init": "a", "train": {"connector": "full", "llm": "lora"}, "lora": {"r": 2},
             "report_to": []},
        ],
    }
    a, b = resolve_stage(config, "a"), resolve_stage(config, "b")
    assert (a["lora"], a["learning_rate"], a["mm_projector_type"]) == (None, 1e-3, "mlp2x_gelu")
    assert (b["lora"], b["report_to"]) == ({"r": 2}, [])
    assert not {"llm", "init", "train_data", "features_index", "output_dir"} & (set(a) | set(b))
    config["stages"][0]["init"] = "b"
    with pytest.raises(ValueError, match=r"stages\[a\].init: 'b' is not an earlier stage"):
        resolve_stage(config, "a")
    with pytest.raises(ValueError, match="nothing trains"):
        StageConfig(name="x", template="chatml", connector_training="frozen")


def test_report_to_accepts_installed_reporters_only():
    assert StageConfig(name="x", template="chatml").report_to == ["tensorboard"]
    with pytest.raises(ValueError, match=r"report_to: 'comet' is not one of \['mlflow', 'tensorboard', 'wandb'\]"):
        StageConfig(name="x", template="chatml", report_to=["comet"])
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ValueError, match=r"report_to: 'wandb' is not installed \(pip install wandb\)"):
            StageConfig(name="x", template="chatml", report_to=["wandb"])


def test_video_llamas_schedule_warms_up_from_its_start_lr_then_follows_a_cosine_from_step_zero():
    from pipeline.train.trainer import linear_warmup_cosine

    # visionbranch_stage2_finetune.yaml: init_lr 3e-5, min_lr 1e-5, warmup_lr 1e-6, warmup_steps 1000, 3 x 1000 steps
    def lr(step):
        return linear_warmup_cosine(step, 3000, 3e-5, 1000, 1e-6, 1e-5)

    assert lr(0) == pytest.approx(1e-6)
    assert lr(500) == pytest.approx(1e-6 + 29e-6 * 0.5)  # optims.py:110, halfway through the warmup
    assert lr(1000) == pytest.approx(1e-5 + 2e-5 * 0.5 * (1 + math.cos(math.pi / 3)))  # 2.5e-5: below the peak
    assert lr(2999) == pytest.approx(1e-5, rel=1e-5)
