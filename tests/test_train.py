import pytest
import safetensors.torch
import torch
from conftest import run_stage_process, stage_settings

from pipeline.eval.generate import evaluate
from pipeline.io import read_json, read_table
from pipeline.model.video_llm import load_llm, load_stage
from pipeline.train.config import StageConfig, resolve_stage
from pipeline.train.launch import build_command
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
    stage = ["-m", "pipeline.train.stage", "--config", "s.yaml"]
    assert build_command("s.yaml", 0, 1, python="py") == ["py", *stage]  # CPU
    assert build_command("s.yaml", 1, 1, python="py") == ["py", *stage]  # 1 x 1 GPU
    assert build_command("s.yaml", 8, 1, python="py") == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "8", *stage]  # 1 x 8
    assert build_command("s.yaml", 8, 4, head_node="gpu001", job_id="42", python="py") == [  # 4 x 8
        "srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        "py", "-m", "torch.distributed.run", "--nproc_per_node", "8", "--nnodes", "4", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu001:29500", "--rdzv_id", "42", *stage]
    assert build_command("s.yaml", 0, 1, python="py", processes=2) == [  # two CPU processes (gloo)
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *stage]
    with pytest.raises(ValueError, match="rendezvous host"):
        build_command("s.yaml", 8, 2)


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
