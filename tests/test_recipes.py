"""The recipes of config/recipes: each validates against the workflow schema, names the command that runs it, and
trains end to end on the CPU, stage after stage, with a tiny random model of its LLM family (Llama, Qwen2, Phi3)
and tiny features of its layout."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import REPO, run_stage_process
from snakemake.utils import validate

from pipeline.eval.generate import evaluate
from pipeline.features.store import INDEX_COLUMNS, ShardWriter
from pipeline.io import read_table, read_yaml, write_json, write_table
from pipeline.model.checkpoint import load_stage
from pipeline.train.config import resolve_stage

RECIPES = sorted((REPO / "config" / "recipes").glob("*.yaml"))
FAMILY = {"videochatgpt": "llava_v1", "videollama_action": "llama", "llava_ssv2": "qwen2", "llava_ssv2_phi": "phi3",
          "videochat_flash": "qwen2", "etchat": "phi3"}
DIM = 8  # feature width of the tiny features


def _recipe(path: Path) -> dict:
    config = read_yaml(path)
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))  # fills in the defaults
    return config


def test_there_is_a_recipe_per_seed_system():
    assert {path.stem for path in RECIPES} == set(FAMILY)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_validates_resolves_and_names_its_command(path):
    config = _recipe(path)
    header = path.read_text(encoding="utf-8").split("\n\n")[0]
    assert f"snakemake --configfile config/recipes/{path.name} --replace-workflow-config" in header
    for stage in config["stages"]:
        resolved = resolve_stage(config, stage["name"])
        if resolved["deepspeed"]:
            assert (REPO / resolved["deepspeed"]).is_file()
    datasets = {d["name"] for d in config["instructions"]["datasets"]}
    assert {e["dataset"] for s in config["stages"] for e in s.get("data") or []} <= datasets


@pytest.fixture(scope="session")
def family_llms(tmp_path_factory, tokenizer_dir, tiny_llm_dir) -> dict[str, Path]:
    """Tiny random LLMs of each family with SmolLM2's tokenizer; ``llava_v1`` is the tiny Llama saved as an
    original LLaVA-v1 checkpoint (model_type llava, with model.mm_projector weights for DIM-wide features)."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    out = {"llama": tiny_llm_dir}
    torch.manual_seed(0)
    for name, config, model in (("qwen2", Qwen2Config, Qwen2ForCausalLM), ("phi3", Phi3Config, Phi3ForCausalLM)):
        folder = tmp_path_factory.mktemp(name)
        model(config(**common)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[name] = folder
    llava = tmp_path_factory.mktemp("llava_v1") / "llava"
    shutil.copytree(tiny_llm_dir, llava)
    weights = safetensors.torch.load_file(llava / "model.safetensors")
    weights.update({"model.mm_projector.weight": torch.randn(32, DIM), "model.mm_projector.bias": torch.zeros(32)})
    safetensors.torch.save_file(weights, llava / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((llava / "config.json").read_text())
    config.update(model_type="llava", architectures=["LlavaLlamaForCausalLM"], mm_hidden_size=DIM)
    (llava / "config.json").write_text(json.dumps(config))
    out["llava_v1"] = llava
    return out


def _tiny_features(folder: Path, pooling: str) -> Path:
    """Four videos of the recipe's layout: videochatgpt T + S = 4 + 2 rows, or frames 6 frames x 2 tokens."""
    rng = np.random.default_rng(0)
    t, s, rows = (4, 2, 6) if pooling == "videochatgpt" else (6, 2, 12)
    with ShardWriter(folder / "shard-00000.h5", attrs={}) as writer:
        for i in range(4):
            writer.add(f"v{i}", rng.standard_normal((rows, DIM)).astype(np.float16), pooling, t, s,
                       np.arange(t), np.arange(t, dtype=np.float32))
    write_table(folder / "index.tsv", [{"video_id": f"v{i}", "path": str(folder / "shard-00000.h5"), "tokens": rows,
                                        "dim": DIM, "duration": 6.0} for i in range(4)], INDEX_COLUMNS)
    return folder / "index.tsv"


def _records(split: str) -> list[dict]:
    return [{"id": f"{split}{v}_{j}", "video": f"v{v}", "conversations": [
        {"from": "human", "value": f"<video>\nWhat happens at {j} seconds?"},
        {"from": "gpt", "value": f"Event {v} at {j}.5s."}]} for v in range(4) for j in range(2)]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_trains_every_stage_end_to_end_on_the_cpu(tmp_path, path, family_llms):
    config = _recipe(path)
    family = FAMILY[path.stem]
    config["llm"]["name_or_path"] = str(family_llms[family])
    if config["model"]["mm_projector_init"]:
        config["model"]["mm_projector_init"] = str(family_llms[family])
    results = tmp_path / "results"
    (results / "features").mkdir(parents=True)
    index = _tiny_features(results / "features", config["features"]["pooling"])
    for stage in config["stages"]:
        settings = resolve_stage(config, stage["name"])
        stage_dir = results / "train" / stage["name"]  # the paths of the workflow's layout (common.smk stage_inputs)
        init = results / "train" / stage["init"] / "model" if stage["init"] else config["llm"]["name_or_path"]
        settings.update(train_data=str(stage_dir / "data.json"), features_index=str(index), init=str(init),
                        output_dir=str(stage_dir))
        write_json(settings["train_data"], _records("train"))
        settings.update(bf16=False, batch_size=2, gradient_accumulation_steps=1, epochs=1, dataloader_workers=0,
                        logging_steps=1, deepspeed=settings["deepspeed"] and str(REPO / settings["deepspeed"]))
        done = run_stage_process(tmp_path, settings)
        assert done.returncode == 0, f"{path.stem} {stage['name']}: {done.stderr[-4000:]}"
        assert len(read_table(Path(settings["output_dir"]) / "loss.tsv")) == 4  # 8 records, 2 a step
    last = results / "train" / config["stages"][-1]["name"] / "model"
    model, meta = load_stage(last)
    assert meta["template"] == resolve_stage(config, config["stages"][-1]["name"])["template"]
    write_json(tmp_path / "val.json", _records("val"))
    metrics = evaluate(last, [tmp_path / "val.json"], index, tmp_path / "eval", max_new_tokens=4)
    assert metrics["count"] == 8
