"""Vision in the loop: tiny towers of every family (open_clip, UMT-L, the SSv2 fork's multi-channel CLIP), the
ToMe connector, online stages that decode frames in DataLoader workers and train the tower, per-group learning
rates, and bad videos at training time."""

import json
import os
import signal
import time

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import TINY_CLIP, flat_clip, run_stage_process, stage_settings

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.frames import TowerGeometry
from pipeline.features.encoder import EncoderConfig, FrameEncoder
from pipeline.io import read_table, write_json, write_table
from pipeline.manifest import package_file
from pipeline.model.checkpoint import load_stage
from pipeline.model.connectors import build_connector
from pipeline.model.connectors.tome import merge_tokens
from pipeline.train.config import StageConfig
from pipeline.train.trainer import build_model, parameter_group, stage_tokenizer
from pipeline.video.ffmpeg import Encoding, encode
from pipeline.video.index import VIDEO_COLUMNS
from pipeline.vision import build_tower

OPEN_CLIP = {key: TINY_CLIP[key] for key in ("backend", "model", "pretrained", "seed", "layer", "overrides")}
UMT = {"backend": "umt", "model": "umt-l", "pretrained": None, "seed": 0, "layer": -1,
       "overrides": {"dim": 32, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 4,
                     "pretrain_image_size": 32}}


def _multichannel(tiny_hf_clip_dir):
    return {"backend": "multichannel_clip", "model": str(tiny_hf_clip_dir), "pretrained": None, "seed": 0,
            "layer": -1, "overrides": {"image_size": 32, "patch_size": 16}}


@pytest.fixture(params=["open_clip", "umt", "multichannel_clip"])
def tower_settings(request, tiny_hf_clip_dir):
    return {"open_clip": OPEN_CLIP, "umt": UMT, "multichannel_clip": _multichannel(tiny_hf_clip_dir)}[request.param]


def _tower(settings):
    return build_tower(settings["backend"], settings["model"], settings["pretrained"], settings["layer"],
                       settings["overrides"], settings["seed"])


def test_online_and_cached_towers_give_the_same_tokens_for_the_same_frames(tower_settings):
    """The features rule's FrameEncoder and the model's in-step tower are the same code on the same frames."""
    from pipeline.model.video_llm import VideoLLM

    frames = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (16, 3, 32, 32), dtype=np.uint8))
    cached = FrameEncoder(EncoderConfig(**tower_settings, resize="stretch")).patch_tokens(frames, batch_size=8)
    tower = _tower(tower_settings).eval()
    model = VideoLLM(torch.nn.Identity(), build_connector("linear", tower.dim, 4), vision_tower=tower)
    rows, layouts = model.vision_tokens(frames, torch.tensor([16]))
    assert layouts == [(cached.shape[0], cached.shape[1])]
    assert torch.allclose(rows.reshape(cached.shape), cached, atol=1e-5)
    geometry = TowerGeometry.of(tower)
    assert geometry.out_frames(16) == cached.shape[0] and geometry.patches == cached.shape[1]


def test_tome_merges_clips_of_four_frames_to_sixteen_tokens_a_frame_and_an_image_to_64():
    torch.manual_seed(0)
    connector = build_connector("tome16_mlp_hd64", 128, 8)
    assert [name for name, _ in connector.named_parameters()] == ["mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                                                                 "mlp.2.bias"]  # its checkpoints' mm_projector.mlp.*
    assert connector.heads == 2  # D / 64
    assert connector.num_tokens(8, 100, 800) == 2 * 64 and connector.num_tokens(1, 100, 100) == 64
    video, image = torch.randn(8 * 100, 128), torch.randn(100, 128)
    out = connector.project(torch.cat([video, image]), [(8, 100), (1, 100)])
    assert out.shape == (128 + 64, 8)
    with pytest.raises(ValueError, match="not a whole number of clips"):
        connector.num_tokens(6, 100, 600)
    with pytest.raises(ValueError, match="per-frame tokens"):
        connector.num_tokens(0, 256, 356)
    # merging keeps the mean: every merged token is a size-weighted mean of originals
    x = torch.randn(1, 400, 128)
    merged = merge_tokens(x, 64, heads=2)
    assert merged.shape == (1, 64, 128)
    same = torch.ones(1, 40, 128)  # identical tokens merge to themselves
    assert torch.allclose(merge_tokens(same, 16, heads=2), torch.ones(1, 16, 128))


def _stage(**kwargs):
    return StageConfig(name="s", template="chatml", **kwargs)


@pytest.mark.parametrize(("tower_training", "connector", "llm"), [
    ("full", "full", "full"),        # VideoChat-Flash stages 2 and 3
    ("full", "full", "frozen"),      # its stage 4
    ("frozen", "full", "frozen"),    # its stage 1, online
    ("lora", "frozen", "frozen"),    # adapters on the tower alone
])
def test_gradients_reach_exactly_the_modules_a_stage_trains_tower_included(tiny_llm_dir, tower_settings,
                                                                           tower_training, connector, llm):
    kind = "tome16_mlp_hd64" if tower_settings["backend"] == "umt" else "mlp2x_gelu"
    targets = {"umt": ["qkv", "attn.proj"], "open_clip": ["c_fc", "c_proj"], "multichannel_clip": ["q_proj", "v_proj"]}
    vision_lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": targets[tower_settings["backend"]]}
    config = _stage(vision="online", vision_tower=tower_settings, vision_tower_training=tower_training,
                    connector_training=connector, llm_training=llm, mm_projector_type=kind,
                    vision_lora=vision_lora if tower_training == "lora" else None)
    tokenizer, base_vocab = stage_tokenizer(config, str(tiny_llm_dir))
    tower = _tower(tower_settings)
    model, meta = build_model(config, str(tiny_llm_dir), tower.dim, tokenizer, base_vocab, tower)
    groups = {"vision_tower": tower_training == "full", "connector": connector == "full", "llm": llm == "full",
              "lora": tower_training == "lora"}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in model.named_parameters() if groups[parameter_group(name)]}
    if tower_training == "lora":  # LoRA B starts at zero, so A gets no gradient on the first step
        assert trainable and all(name.startswith("vision_tower.") for name in trainable)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p)
    frames = 16  # a whole clip of every family
    out = TowerGeometry.of(tower).out_frames(frames)
    n = model.mm_projector.num_tokens(out, tower.num_patches, out * tower.num_patches)
    batch = {"input_ids": torch.tensor([[5] + [VIDEO_TOKEN_INDEX] * n + [6, 7]]),
             "labels": torch.tensor([[IGNORE_INDEX] * (n + 1) + [6, 7]]),
             "pixel_values": torch.randint(0, 255, (frames, 3, 32, 32), dtype=torch.uint8),
             "visual_frames": torch.tensor([frames])}
    model(**batch).loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad <= trainable
    for group, trains in groups.items():
        names = {name for name in trainable if parameter_group(name) == group}
        assert bool(names & with_grad) == trains, group
    if tower_training != "frozen":  # every block up to the selected layer learns
        assert {n for n in trainable if n.startswith("vision_tower.")} <= with_grad
    assert meta["vision"] == "online" and meta["vision_tower"] == tower_settings


def test_lora_on_an_attention_that_never_calls_its_projections_is_refused(tiny_llm_dir):
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["out_proj"]}  # open_clip: nn.MultiheadAttention
    config = _stage(vision="online", vision_tower=OPEN_CLIP, vision_tower_training="lora", vision_lora=lora)
    tokenizer, base_vocab = stage_tokenizer(config, str(tiny_llm_dir))
    tower = _tower(OPEN_CLIP)
    with pytest.raises(ValueError, match="nn.MultiheadAttention, which reads its projections' weights directly"):
        build_model(config, str(tiny_llm_dir), tower.dim, tokenizer, base_vocab, tower)
    umt = _stage(vision="online", vision_tower=UMT, vision_tower_training="lora",
                 vision_lora={**lora, "target_modules": ["qkv", "proj"]})  # proj: also UMT's patch embedding
    with pytest.raises(ValueError, match="patch_embed.proj is a Conv3d, not a linear layer"):
        build_model(umt, str(tiny_llm_dir), 32, tokenizer, base_vocab, _tower(UMT))


def test_merging_lora_into_the_tower_is_peft_s_merge():
    from peft import LoraConfig, inject_adapter_in_model

    from pipeline.model.checkpoint import merge_lora

    tower = _tower(UMT)
    plain = {k: v.clone() for k, v in tower.state_dict().items()}
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=6, target_modules=["qkv", "attn.proj"]), tower)
    for name, p in tower.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    merged = merge_lora(tower.state_dict(), 6 / 2)
    assert merged.keys() == plain.keys()
    frames = torch.randn(4, 3, 32, 32)
    expected = tower(frames)
    fresh = _tower(UMT)
    fresh.load_state_dict(merged)
    assert torch.allclose(fresh(frames), expected, atol=1e-4)  # float32 rounding of W + s B A
    assert not torch.equal(merged["encoder.blocks.0.attn.qkv.weight"], plain["encoder.blocks.0.attn.qkv.weight"])


def test_each_parameter_group_gets_its_learning_rate_and_biases_and_norms_no_decay(tiny_llm_dir):
    from transformers import TrainingArguments

    from pipeline.train.trainer import VideoLLMTrainer

    groups = {"vision_tower": {"learning_rate": 2e-6, "weight_decay": 0.1},
              "connector": {"learning_rate": 1e-3, "weight_decay": 0.0},
              "llm": {"learning_rate": 1e-5, "weight_decay": 0.05}, "lora": {"learning_rate": 2e-4, "weight_decay": 0}}
    config = _stage(vision="online", vision_tower=OPEN_CLIP, vision_tower_training="full", llm_training="full",
                    param_groups=groups)
    tokenizer, base_vocab = stage_tokenizer(config, str(tiny_llm_dir))
    tower = _tower(OPEN_CLIP)
    model, meta = build_model(config, str(tiny_llm_dir), tower.dim, tokenizer, base_vocab, tower)
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[], learning_rate=1.0)
    trainer = VideoLLMTrainer(model=model, args=args, stage_meta=meta, param_groups=config.param_groups)
    optimizer = trainer.create_optimizer()
    names = {id(p): name for name, p in model.named_parameters()}
    seen = set()
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.add(name)
            assert group["lr"] == groups[parameter_group(name)]["learning_rate"], name
            no_decay = name.endswith("bias") or "norm" in name.lower() or "ln_" in name
            expected = 0.0 if no_decay else groups[parameter_group(name)]["weight_decay"]
            assert group["weight_decay"] == expected, name
    assert seen == {name for name, p in model.named_parameters() if p.requires_grad}
    assert {group["group"] for group in optimizer.param_groups} == {"vision_tower", "connector", "llm"}


@pytest.fixture(scope="module")
def online_data(tmp_path_factory):
    """Eight 2 s, 8 fps mp4 clips of 32 px frames (each a flat colour plus noise), their videos index, and two
    records per video; plus one file named .mp4 that holds text."""
    root = tmp_path_factory.mktemp("online")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        raw = root / f"raw{i}.webm"
        flat_clip(raw, 50 * (i % 4), rng)
        info = encode({"path": str(raw)}, root / f"v{i}.mp4", Encoding(fps=8, size=32, audio=False))
        rows.append({"video_id": f"v{i}", "path": str(root / f"v{i}.mp4"), **info})
    picture = package_file("iscc_samples", "files/image/demo.jpg")  # an image record's picture: one frame
    info = encode({"path": str(picture)}, root / "img0.mp4", Encoding(fps=8, size=32, audio=False))
    rows.append({"video_id": "img0", "path": str(root / "img0.mp4"), **info})
    broken = root / "broken.mp4"
    broken.write_text("not a video\n")
    rows.append({"video_id": "broken", "path": str(broken), "frames": 16, "fps": 8, "duration": 2.0})
    write_table(root / "videos.tsv", rows, VIDEO_COLUMNS)
    records = [{"id": f"{row['video_id']}_{j}", "video": row["video_id"], "conversations": [
        {"from": "human", "value": f"<video>\nQuestion {j}?"}, {"from": "gpt", "value": f"Answer {i % 4}."}],
        **({"modality": "image"} if row["video_id"] == "img0" else {})}
        for i, row in enumerate(rows) for j in range(2)]
    write_json(root / "train.json", records)
    return root


def _online_settings(tmp_path, tiny_llm_dir, data, name, **settings):
    online = dict(features_index=None, videos=str(data / "videos.tsv"), vision="online", vision_tower=UMT,
                  vision_tower_training="full", mm_projector_type="tome16_mlp_hd64",
                  frames={"sampling": "midpoints", "num_frames": 4}, max_length=192, batch_size=2, epochs=1,
                  dataloader_workers=1, deepspeed=None)
    return stage_settings(tmp_path, tiny_llm_dir, data, name, **{**online, **settings})


def test_an_online_stage_trains_the_tower_skips_a_bad_video_and_the_next_stage_starts_from_its_tower(
        tmp_path, tiny_llm_dir, online_data):
    settings = _online_settings(tmp_path, tiny_llm_dir, online_data, "online",
                                video_prompt="\nThe video lasts for {duration:.2f} seconds, and {frames} frames are "
                                             "uniformly sampled from it. ")
    done = run_stage_process(tmp_path, settings)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "online" / "model"
    excluded = [json.loads(line) for line in (folder / "excluded.jsonl").read_text().splitlines()]
    assert {e["id"] for e in excluded} == {"broken_0", "broken_1"}
    assert all(e["reason"].startswith("at training time: ") and "decode" in e["reason"] for e in excluded)
    assert len(read_table(tmp_path / "online" / "loss.tsv")) == 10  # 20 records, 2 a step: the batches kept size
    metrics = json.loads((tmp_path / "online" / "train_metrics.json").read_text())
    assert metrics["records_by_kind"] == {"video": 18, "image": 2}  # the picture trains as a one-frame video
    assert (metrics["excluded"], metrics["skipped_at_training"]) == (0, 2)
    trained = safetensors.torch.load_file(folder / "vision_tower.safetensors")
    initial = _tower(UMT).state_dict()
    assert trained.keys() == initial.keys() and any(not torch.equal(trained[k], initial[k]) for k in initial)
    model, meta = load_stage(folder)
    assert meta["vision"] == "online" and model.vision_tower is not None
    assert all(torch.equal(model.vision_tower.state_dict()[k], trained[k]) for k in trained)

    follow = {**_online_settings(tmp_path, tiny_llm_dir, online_data, "next", vision_tower_training="frozen"),
              "init": str(folder)}
    done = run_stage_process(tmp_path, follow)
    assert done.returncode == 0, done.stderr[-3000:]
    nxt = tmp_path / "next" / "model"
    assert os.path.samefile(nxt / "vision_tower.safetensors", folder / "vision_tower.safetensors")  # linked, same

    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": ["attn.qkv", "attn.proj"]}
    adapted = {**_online_settings(tmp_path, tiny_llm_dir, online_data, "adapted", vision_tower_training="lora",
                                  vision_lora=lora), "init": str(nxt)}
    done = run_stage_process(tmp_path, adapted)
    assert done.returncode == 0, done.stderr[-3000:]
    merged = safetensors.torch.load_file(tmp_path / "adapted" / "model" / "vision_tower.safetensors")
    assert merged.keys() == trained.keys()  # the adapters merged: a plain tower the next stage loads
    assert not torch.equal(merged["encoder.blocks.0.attn.qkv.weight"], trained["encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(merged["encoder.blocks.0.mlp.fc1.weight"], trained["encoder.blocks.0.mlp.fc1.weight"])
    assert load_stage(tmp_path / "adapted" / "model")[0].vision_tower is not None

    cached = {**stage_settings(tmp_path, tiny_llm_dir, online_data, "cached", features_index="unused.tsv"),
              "init": str(folder), "vision_tower": UMT}
    done = run_stage_process(tmp_path, cached)
    assert done.returncode == 1 and "trained the vision tower" in done.stderr


def test_resume_after_sigkill_with_a_training_tower_ends_with_the_same_weights(tmp_path, tiny_llm_dir, online_data):
    whole = _online_settings(tmp_path, tiny_llm_dir, online_data, "whole", save_steps=3, epochs=2)
    assert run_stage_process(tmp_path, whole).returncode == 0
    killed = {**whole, "name": "killed", "output_dir": str(tmp_path / "killed")}
    process = run_stage_process(tmp_path, killed, wait=False)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 600
    while not any((checkpoints / name / "complete").exists() for name in ("checkpoint-3", "checkpoint-6")):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert run_stage_process(tmp_path, killed).returncode == 0
    a = safetensors.torch.load_file(tmp_path / "whole" / "model" / "vision_tower.safetensors")
    b = safetensors.torch.load_file(tmp_path / "killed" / "model" / "vision_tower.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    pa = safetensors.torch.load_file(tmp_path / "whole" / "model" / "mm_projector.safetensors")
    pb = safetensors.torch.load_file(tmp_path / "killed" / "model" / "mm_projector.safetensors")
    assert all(torch.allclose(pa[k], pb[k], atol=1e-6) for k in pa)


def test_the_video_prompt_follows_each_video_marker_as_videochat_flash_writes_it():
    from pipeline.data.dataset import VisualInfo, with_video_prompt

    prompt = "\nThe video lasts for {duration:.2f} seconds, and {frames} frames are uniformly sampled from it. "
    record = {"id": "r", "video": "v", "conversations": [{"from": "human", "value": "<video>\nWhat happens?"},
                                                         {"from": "gpt", "value": "A cat jumps."}]}
    turns = with_video_prompt(record, prompt, [VisualInfo(64, 196, 64 * 196, 64, 12.345)])
    # llava/train/train.py preprocess_multimodal: "<image>" + "\nThe video lasts ... from it. " + "\n" + question
    assert turns[0]["value"] == ("<video>\nThe video lasts for 12.35 seconds, and 64 frames are uniformly sampled "
                                 "from it. \nWhat happens?")
    assert turns[1] == record["conversations"][1] and record["conversations"][0]["value"] == "<video>\nWhat happens?"
    image = {**record, "modality": "image"}  # images never get it (train.py:1471)
    assert with_video_prompt(image, prompt, [VisualInfo(1, 196, 196, 1, 1.0)]) == record["conversations"]


def test_building_a_tower_leaves_the_stage_s_random_stream_alone():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    first = _tower(UMT)
    assert torch.equal(torch.rand(3), expected)  # the connector drawn next depends on the stage's seed only
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), _tower(UMT).state_dict().values()))
