"""The recipes of config/recipes: each validates against the workflow schema, names the command that runs it, and
trains end to end on the CPU, stage after stage, with a tiny random model of its LLM family (Llama, Qwen2, Phi3),
tiny features of its layout for cached stages and, for online stages (vision in the loop), a tiny tower of its
backend (UMT, the SSv2 fork's multi-channel CLIP, EVA-ViT-G) reading a few short 32 px videos; a Q-Former
connector shrunk to a tiny BERT (E.T. Chat's with a tiny question vocabulary), and for a stage with matching,
records whose answers hold <vid> timestamps. Their values against the originals: tests/test_recipe_tables.py."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import REPO, flat_clip, run_stage_process, tiny_bert_tokenizer
from snakemake.utils import validate

from pipeline.eval.generate import evaluate
from pipeline.features.store import INDEX_COLUMNS, ShardWriter
from pipeline.io import read_table, read_yaml, write_json, write_table
from pipeline.model.checkpoint import load_stage
from pipeline.train.config import resolve_stage
from pipeline.video.index import VIDEO_COLUMNS
from pipeline.vision import build_tower

RECIPES = sorted((REPO / "config" / "recipes").glob("*.yaml"))
FAMILY = {"videochatgpt": "llava_v1", "videollama_action": "llama", "llava_ssv2": "qwen2", "llava_ssv2_phi": "phi3",
          "videochat_flash": "qwen2", "etchat": "phi3"}
DIM = 8  # feature width of the tiny features
TOWER_KEYS = ("backend", "model", "pretrained", "seed", "layer", "overrides")
# Tiny towers of each backend an online recipe names (the same code as the real ones, random weights): a UMT of
# 32 px frames in 4 px patches (8 x 8 = 64 patches a frame, more than ToMe's 16); the multi-channel CLIP's folder
# comes from the tiny_multichannel_clip_dir fixture (32 px, 16 px patches: 2 x 2, 3 output frames a clip).
TINY_UMT = {"backend": "umt", "model": "umt-l", "pretrained": None, "seed": 0, "layer": -1,
            "overrides": {"dim": 32, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 4,
                          "pretrain_image_size": 32}}
# EVA-ViT-G of 3 blocks (the recipes' layer -2 keeps 2), width 32, 32 px frames in 8 px patches: 16 a frame
TINY_EVA = {"width": 32, "depth": 3, "heads": 2, "patch_size": 8, "image_size": 32, "mlp_ratio": 2.0}
TINY_BERT = {"hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16, "num_hidden_layers": 2}


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


@pytest.fixture(scope="session")
def tiny_multichannel_clip_dir(tmp_path_factory) -> Path:
    """A tiny transformers CLIPVisionModel folder (width 32, 2 layers, 32 px frames in 16 px patches), random."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_multichannel_clip")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=16, projection_dim=16)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_videos(tmp_path_factory) -> Path:
    """The compressed videos' index (pipeline.video.index) of four 2 s, 8 fps H.264 clips of 32 px frames, v0..v3:
    what an online stage reads."""
    from pipeline.video.ffmpeg import Encoding, encode

    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        raw = root / f"raw{i}.webm"
        flat_clip(raw, 50 * i, rng)
        info = encode({"path": str(raw)}, root / f"v{i}.mp4", Encoding(fps=8, size=32, audio=False))
        rows.append({"video_id": f"v{i}", "path": str(root / f"v{i}.mp4"), **info})
    write_table(root / "index.tsv", rows, VIDEO_COLUMNS)
    return root / "index.tsv"


def _tiny_tower(features: dict, multichannel_dir: Path) -> dict:
    """Tiny tower settings of the backend ``features`` names (pretrained None: random weights)."""
    if features["backend"] == "umt":
        return dict(TINY_UMT)
    if features["backend"] == "multichannel_clip":
        return {"backend": "multichannel_clip", "model": str(multichannel_dir), "pretrained": None, "seed": 0,
                "layer": features["layer"], "overrides": {}}
    if features["backend"] == "eva" and features["model"] == "eva_vit_g":
        return {"backend": "eva", "model": "eva_vit_g", "pretrained": None, "seed": 0, "layer": features["layer"],
                "overrides": dict(TINY_EVA)}
    raise AssertionError(f"no tiny tower for backend {features['backend']!r}: add one for its online recipe")


def _tiny_features(folder: Path, pooling: str, layout: tuple[int, int] | None = None, dim: int = DIM) -> Path:
    """Four videos of the recipe's layout: videochatgpt T + S = 4 + 2 rows, or frames T x S tokens (6 x 2, or the
    ``layout`` of the recipe's tiny tower), ``dim`` wide."""
    rng = np.random.default_rng(0)
    if pooling == "videochatgpt":
        t, s, rows = 4, 2, 6
    else:
        t, s = layout or (6, 2)
        rows = t * s
    with ShardWriter(folder / "shard-00000.h5", attrs={}) as writer:
        for i in range(4):
            writer.add(f"v{i}", rng.standard_normal((rows, dim)).astype(np.float16), pooling, t, s,
                       np.arange(t), np.arange(t, dtype=np.float32))
    write_table(folder / "index.tsv", [{"video_id": f"v{i}", "path": str(folder / "shard-00000.h5"), "tokens": rows,
                                        "dim": dim, "duration": 6.0} for i in range(4)], INDEX_COLUMNS)
    return folder / "index.tsv"


def _records(split: str, matching: bool = False) -> list[dict]:
    """Eight records of the four videos; with ``matching`` their answers name a time as E.T. Chat's <vid>."""
    if matching:
        return [{"id": f"{split}{v}_{j}", "video": f"v{v}", "timestamps": {"src": [], "tgt": [float(j)]},
                 "conversations": [{"from": "human", "value": "<video>\nWhen does it happen?"},
                                   {"from": "gpt", "value": f"Event {v} at <vid>."}]}
                for v in range(4) for j in range(2)]
    return [{"id": f"{split}{v}_{j}", "video": f"v{v}", "conversations": [
        {"from": "human", "value": f"<video>\nWhat happens at {j} seconds?"},
        {"from": "gpt", "value": f"Event {v} at {j}.5s."}]} for v in range(4) for j in range(2)]


def _tiny_connector(config: dict, folder: Path) -> None:
    """A Q-Former connector shrunk to a tiny BERT reading the tiny features (E.T. Chat's with a tiny question
    vocabulary), its released checkpoints not loaded (tests/test_qformer.py loads their key names)."""
    kind = config["model"]["mm_projector_type"]
    if kind == "video_qformer":
        config["model"]["connector"] = {**TINY_BERT, "num_query_tokens": 4, "image_query_tokens": 2}
    elif kind == "etchat_qformer":
        config["model"]["connector"] = {**TINY_BERT, "num_query_tokens": 4,
                                        "tokenizer": str(tiny_bert_tokenizer(folder / "bert"))}
    else:
        return
    for stage in config["stages"]:
        stage["mm_projector_init"] = None


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_recipe_trains_every_stage_end_to_end_on_the_cpu(tmp_path, path, family_llms, tiny_videos,
                                                           tiny_multichannel_clip_dir):
    config = _recipe(path)
    family = FAMILY[path.stem]
    config["llm"]["name_or_path"] = str(family_llms[family])
    if config["model"]["mm_projector_init"]:
        config["model"]["mm_projector_init"] = str(family_llms[family])
    _tiny_connector(config, tmp_path)
    results = tmp_path / "results"
    (results / "features").mkdir(parents=True)
    features = config["features"]
    layout, dim = None, DIM
    if any(stage["vision"] == "online" for stage in config["stages"]):
        # online stages run the recipe's tower family, tiny; cached stages then read tokens of its layout and width
        features.update(_tiny_tower(features, tiny_multichannel_clip_dir))
        tower = build_tower(*(features[key] for key in ("backend", "model", "pretrained", "layer", "overrides",
                                                        "seed")))
        frames = features["num_frames"] if features["sampling"] != "fps" else tower.clip_frames
        layout, dim = (tower.out_frames(frames), tower.num_patches), tower.dim
    index = _tiny_features(results / "features", features["pooling"], layout, dim)
    for stage in config["stages"]:
        settings = resolve_stage(config, stage["name"])
        stage_dir = results / "train" / stage["name"]  # the paths of the workflow's layout (common.smk stage_inputs)
        init = results / "train" / stage["init"] / "model" if stage["init"] else config["llm"]["name_or_path"]
        online = settings.get("vision") == "online"
        settings.update(train_data=str(stage_dir / "data.json"), init=str(init), output_dir=str(stage_dir),
                        **({"videos": str(tiny_videos)} if online else {"features_index": str(index)}))
        if settings.get("resolution"):
            settings["resolution"] = 64  # VideoChat-Flash's 448 px stage: the tiny tower at twice its 32 px
        if online and settings["frames"].get("sampling") == "fps" and settings["frames"]["min_frames"] > 8:
            # its 64-512 frames stages: still more frames than a 2 s video has at 1 fps, in fewer clips
            settings["frames"] = {**settings["frames"], "min_frames": 8, "max_frames": 16}
        if settings.get("min_duration"):
            settings["min_duration"] = 1.0  # E.T. Chat's 5 s lower bound: the tiny videos last 2 s
        write_json(settings["train_data"], _records("train", bool(settings.get("matching"))))
        settings.update(bf16=False, batch_size=2, gradient_accumulation_steps=1, epochs=1, dataloader_workers=0,
                        max_steps=None, warmup_steps=None,  # Video-LLaMA counts 3,000 steps, not epochs
                        logging_steps=1, deepspeed=settings["deepspeed"] and str(REPO / settings["deepspeed"]))
        done = run_stage_process(tmp_path, settings)
        assert done.returncode == 0, f"{path.stem} {stage['name']}: {done.stderr[-4000:]}"
        assert len(read_table(Path(settings["output_dir"]) / "loss.tsv")) == 4  # 8 records, 2 a step
    last = results / "train" / config["stages"][-1]["name"] / "model"
    model, meta = load_stage(last)
    resolved = resolve_stage(config, config["stages"][-1]["name"])
    assert meta["template"] == resolved["template"]
    assert meta.get("vision", "cached") == resolved.get("vision", "cached")
    write_json(tmp_path / "val.json", _records("val", bool(resolved.get("matching"))))
    online = resolved.get("vision") == "online"
    metrics = evaluate(last, [tmp_path / "val.json"], None if online else index, tmp_path / "eval", max_new_tokens=4,
                       videos=tiny_videos if online else None)
    assert metrics["count"] == 8
