"""Exporting a stage (``python -m pipeline.export``): tiny stage folders with a LoRA adapter to merge, written as our
registered Hugging Face classes and as ``LlavaNextVideoForConditionalGeneration``, loaded back in a fresh process,
with the same logits and greedy tokens as :func:`pipeline.model.checkpoint.load_stage`'s model; and the one-line
refusal of an architecture LLaVA-NeXT-Video has no counterpart for."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CLIP

from pipeline import VIDEO_TOKEN_INDEX
from pipeline.model.checkpoint import build_stage_tower, load_stage, save_trained, write_stage_folder
from pipeline.train.config import StageConfig
from pipeline.train.trainer import build_model, stage_tokenizer

OPEN_CLIP = {key: TINY_CLIP[key] for key in ("backend", "model", "pretrained", "seed", "layer", "overrides")}
UMT = {"backend": "umt", "model": "umt-l", "pretrained": None, "seed": 0, "layer": -1,
       "overrides": {"dim": 32, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 4, "pretrain_image_size": 32}}
EVA = {"backend": "eva", "model": "eva_vit_g", "pretrained": None, "seed": 0, "layer": -1,
       "overrides": {"width": 32, "depth": 3, "heads": 2, "patch_size": 8, "image_size": 32}}
TINY_BERT = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_query_tokens": 4}  # E.T. Chat's Q-Former, shrunk
FRAMES, PROMPT = 2, [1, 2, 3]  # frames: at least, and a whole number of the tower's clips
QUESTION = {"query_input_ids": torch.tensor([[101, 2054, 102]]), "query_attention_mask": torch.ones(1, 3).long()}


def _stage(folder, llm_dir, tower: dict, projector: str, vision: str = "online", **settings):
    """A stage folder: the tiny Llama with a LoRA adapter of random (non-zero) weights, the ``projector`` connector
    from ``tower``'s tokens, random weights throughout."""
    config = StageConfig(name="export", template="chatml", mm_projector_type=projector, llm_training="lora",
                         lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                         vision=vision, vision_tower=tower, deepspeed=None, report_to=[], **settings)
    tokenizer, base_vocab = stage_tokenizer(config, str(llm_dir))
    built = build_stage_tower({"vision_tower": tower, "resolution": None, "vision_tower_weights": None})
    torch.manual_seed(1)
    model, meta = build_model(config, str(llm_dir), built.dim, tokenizer, base_vocab,
                              built if vision == "online" else None)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "extra_embeddings" in name:
                param.normal_(0, 0.5)
    save_trained(model, folder, meta)
    write_stage_folder(folder, meta, tokenizer)
    return folder


def _inputs(model, frames: torch.Tensor):
    """A prompt of 3 text tokens, the video's positions, 3 more; ``(1, L)`` ids and the visual's keyword arguments."""
    count = model.mm_projector.num_tokens(frames.shape[0], model.vision_tower.num_patches,
                                          frames.shape[0] * model.vision_tower.num_patches)
    ids = torch.tensor([PROMPT + [VIDEO_TOKEN_INDEX] * count + PROMPT])
    return ids, {"pixel_values": frames, "visual_frames": torch.tensor([frames.shape[0]])}


def _frames(tower) -> torch.Tensor:
    """``(T, 3, H, W)`` uint8 random frames for ``tower``: T = :data:`FRAMES` or one clip of the tower's."""
    count, (height, width) = max(FRAMES, tower.clip_frames), tower.image_size
    return torch.from_numpy(np.random.default_rng(0).integers(0, 255, (count, 3, height, width), dtype=np.uint8))


def _export(stage, out, fmt: str):
    return subprocess.run([sys.executable, "-m", "pipeline.export", "--stage", str(stage), "--out", str(out),
                           "--format", fmt], cwd=REPO, capture_output=True, text=True)


def _fresh(script: str):
    """Run ``script`` in a new interpreter (nothing of this process's registrations); it prints one JSON line."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def stages(tmp_path_factory, tiny_llm_dir, tiny_hf_clip_dir) -> dict:
    """Four stages: LLaVA-NeXT-Video's architecture without pooling (online 2-layer CLIP of ViT-L/14's geometry,
    the first block's tokens, ``mlp2x_gelu``), Video-ChatGPT's (cached rows, ``linear``, ``<vid_start>``/``<vid_end>``
    added), an online UMT (position embeddings in non-persistent buffers) and E.T. Chat's (EVA, its
    question-conditioned Q-Former, ``<vid>`` matching)."""
    root = tmp_path_factory.mktemp("export")
    hf_clip = {"backend": "hf_clip", "model": str(tiny_hf_clip_dir), "pretrained": None, "seed": 0, "layer": -2,
               "overrides": {}}
    return {"llava": _stage(root / "llava", tiny_llm_dir, hf_clip, "mlp2x_gelu"),
            "videochatgpt": _stage(root / "videochatgpt", tiny_llm_dir, OPEN_CLIP, "linear", vision="cached",
                                   video_start_end=True),
            "umt": _stage(root / "umt", tiny_llm_dir, UMT, "mlp2x_gelu"),
            "etchat": _stage(root / "etchat", tiny_llm_dir, EVA, "etchat_qformer", connector=TINY_BERT,
                             matching={"alpha": 2.0, "bidirectional_frames": True})}


def _reference(stage) -> tuple[dict, torch.Tensor, list]:
    """The inputs (``input_ids`` and the visual's), logits ``(1, L, V)`` float32 and ``[4 greedy tokens, the frame
    of each <vid> among them (None without matching)]`` of the stage's model as :func:`load_stage` gives it."""
    model, meta = load_stage(stage)
    if meta["vision"] == "online":
        ids, visual = _inputs(model, _frames(model.vision_tower))
        if model.matching is not None:  # E.T. Chat's: the question in BERT's vocabulary
            visual.update(QUESTION)
    else:  # Video-ChatGPT's layout: T temporal + S spatial pooled rows, wrapped in the added tokens
        features = torch.randn(FRAMES + 4, meta["mm_hidden_size"], generator=torch.Generator().manual_seed(0))
        start = meta["base_vocab"]
        ids = torch.tensor([PROMPT + [start] + [VIDEO_TOKEN_INDEX] * len(features) + [start + 1] + PROMPT])
        visual = {"video_features": features}
    with torch.no_grad():
        logits = model(ids, **visual).logits
    tokens = model.generate(ids, torch.ones_like(ids), **visual, max_new_tokens=4, do_sample=False)
    tokens, matched = tokens if model.matching is not None else (tokens, None)
    return {"input_ids": ids, **visual}, logits, [tokens[0].tolist(), matched]


def test_exported_stages_load_in_a_fresh_process_and_give_the_same_logits_and_tokens(stages, tmp_path):
    import safetensors.torch

    from pipeline.export import main
    from pipeline.features.encoder import normalize

    expected = {}
    for name, stage in stages.items():
        assert main(["--stage", str(stage), "--out", str(tmp_path / f"{name}.hf")]) == 0
        inputs, logits, tokens = _reference(stage)
        safetensors.torch.save_file(inputs, tmp_path / f"{name}.inputs.safetensors")
        expected[name] = (logits, tokens)
    assert main(["--stage", str(stages["llava"]), "--out", str(tmp_path / "llava.lnv"),
                 "--format", "llava_next_video"]) == 0
    written = json.loads((tmp_path / "llava.hf" / "config.json").read_text())
    assert (written["model_type"], written["architectures"]) == ("video_llm_hf", ["VideoLLMForCausalLM"])
    assert written["stage"]["adapters"] == [] and written["stage"]["vision_tower"]["pretrained"] is None
    tokenizer = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert {p.name for p in (tmp_path / "llava.hf").iterdir()} == {"config.json", "model.safetensors", *tokenizer}
    assert {p.name for p in (tmp_path / "llava.lnv").iterdir()} == {"config.json", "generation_config.json",
                                                                     "model.safetensors", *tokenizer}
    model = load_stage(stages["llava"])[0]
    frames = safetensors.torch.load_file(tmp_path / "llava.inputs.safetensors")["pixel_values"]
    safetensors.torch.save_file({"pixel_values_videos": normalize(frames, model.vision_tower)[None]},
                                tmp_path / "llava.lnv.inputs.safetensors")

    got = _fresh(f"""
        import json
        import safetensors.torch, torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        root, out = {str(tmp_path)!r}, {{}}
        lnv = AutoModelForImageTextToText.from_pretrained(root + "/llava.lnv")  # plain transformers, nothing of ours
        ids = safetensors.torch.load_file(root + "/llava.inputs.safetensors")["input_ids"]
        ids = ids.masked_fill(ids == {VIDEO_TOKEN_INDEX}, lnv.config.video_token_index)
        pixels = safetensors.torch.load_file(root + "/llava.lnv.inputs.safetensors")["pixel_values_videos"]
        with torch.no_grad():
            logits = {{"lnv": lnv(input_ids=ids, pixel_values_videos=pixels).logits}}
        tokens = lnv.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=4, do_sample=False)
        out["lnv"] = [type(lnv).__name__, tokens[0, ids.shape[1]:].tolist()]

        import pipeline.model.hf  # registers our classes with the Auto classes
        for name in ("llava", "videochatgpt", "umt", "etchat"):
            model = AutoModelForCausalLM.from_pretrained(root + f"/{{name}}.hf")
            inputs = safetensors.torch.load_file(root + f"/{{name}}.inputs.safetensors")
            ids = inputs.pop("input_ids")
            with torch.no_grad():
                logits[name] = model(ids, **inputs).logits
            tokens = model.generate(ids, torch.ones_like(ids), **inputs, max_new_tokens=4, do_sample=False)
            tokens, matched = tokens if name == "etchat" else (tokens, None)  # and each <vid>'s frame
            out[name] = [type(model).__name__, [tokens[0].tolist(), matched]]
        safetensors.torch.save_file(logits, root + "/logits.safetensors")
        print(json.dumps(out))
        """)
    logits = safetensors.torch.load_file(tmp_path / "logits.safetensors")
    for name, (reference, tokens) in expected.items():
        assert got[name] == ["VideoLLMForCausalLM", tokens]
        difference = (logits[name] - reference).abs().max()
        assert difference <= 1e-5, (name, difference)
    reference, tokens = expected["llava"]
    vocab = reference.shape[-1]
    assert logits["lnv"].shape[-1] == vocab + 2  # <image> and <video> added, their output rows the mean of the others
    difference = (logits["lnv"][..., :vocab] - reference).abs().max()
    assert difference <= 1e-3, difference
    assert got["lnv"] == ["LlavaNextVideoForConditionalGeneration", tokens[0]]


def test_an_architecture_without_a_llava_next_video_counterpart_is_refused_in_one_line(stages, tmp_path):
    from pipeline.export import llava_next_video_blocker
    from pipeline.model.checkpoint import read_stage_config

    done = _export(stages["videochatgpt"], tmp_path / "out", "llava_next_video")
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    lines = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and "no LLaVA-NeXT-Video counterpart for vision: cached" in lines[0], done.stderr
    assert "vision tower umt" in llava_next_video_blocker(read_stage_config(stages["umt"]))
    meta = read_stage_config(stages["llava"])
    assert llava_next_video_blocker(meta) is None
    for change, part in (({"mm_projector_type": "tome16_mlp_hd64"}, "connector tome16_mlp_hd64"),
                         ({"base_vocab": 49152}, "added tokens"),
                         ({"matching": {"alpha": 2.0, "bidirectional_frames": True, "token_id": 5}}, "matching head"),
                         ({"resolution": 112}, "resolution 112: the tower interpolates its 224 px")):
        assert llava_next_video_blocker({**meta, **change}).startswith(part)
