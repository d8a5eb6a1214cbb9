"""Proof that the pipeline learns: generated videos of a moving square in one of four colours go through the real
pipeline code (manifest of class folders, compression, CLIP features, class-folder instructions split by video,
a training stage, generation) and a tiny model names the colour of held-out videos: from cached features of a
frozen random tower, and with online vision, a tiny UMT tower trained from random weights inside the step and
VideoChat-Flash's token-merging connector.

A falling loss does not catch a wrong label mask, video rows spliced at the wrong positions or a projector that
never sees the features; answering held-out videos right does: the colour is only in the pixels."""

import json

import av
import numpy as np
import pytest
from conftest import TINY_CLIP, run_stage_process, stage_settings

from pipeline.data.formats import Options
from pipeline.data.instructions import build
from pipeline.eval.generate import evaluate
from pipeline.features import extract
from pipeline.features.extract import FeatureConfig
from pipeline.features.store import write_index
from pipeline.io import write_table
from pipeline.manifest import rows_from_folder
from pipeline.video.ffmpeg import Encoding, encode
from pipeline.video.index import VIDEO_COLUMNS

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def _write_video(path, colour, rng, frames=16, size=96, side=40):
    """A 2 s, 8 fps VP9 webm: a ``side`` px square of ``colour`` moving in a straight line over dark noise."""
    start, velocity = rng.integers(0, size - side, 2), rng.uniform(-3, 3, 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
            x, y = np.clip(start + velocity * i, 0, size - side).astype(int)
            image[y:y + side, x:x + side] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def probe_videos(tmp_path_factory):
    """20 videos of each colour as class folders, and their compressed copies (as rules transcode/compress: 3 fps,
    short side 64) with the compress stage's status rows."""
    root = tmp_path_factory.mktemp("probe")
    rng = np.random.default_rng(0)
    raw = root / "raw"
    for colour, rgb in COLOURS.items():
        (raw / colour).mkdir(parents=True)
        for i in range(20):
            _write_video(raw / colour / f"clip{i}.webm", rgb, rng)
    compressed = root / "compressed"
    compressed.mkdir()
    rows = []
    for row in rows_from_folder(raw):
        dest = compressed / f"{row['video_id']}.mp4"
        info = encode({"path": row["source"]}, dest, Encoding(fps=3, size=64, audio=False))
        rows.append({"video_id": row["video_id"], "path": str(dest), "status": "ok", **info})
    return raw, rows


def _answers(tmp_path, model_dir, index=None, videos=None):
    metrics = evaluate(model_dir, [tmp_path / "instructions" / "val.json"], index, tmp_path / "eval",
                       max_new_tokens=4, videos=videos)
    wrong = [line for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
             if '"prediction": "' not in line or json.loads(line)["prediction"] != json.loads(line)["reference"]]
    return metrics, wrong


def test_a_tiny_model_names_the_colour_of_held_out_videos(tmp_path, tiny_llm_dir, probe_videos):
    raw, rows = probe_videos
    config = FeatureConfig.from_dict({**TINY_CLIP, "num_frames": 4, "pooling": "videochatgpt", "workers": 0})
    status = extract.extract_shard(rows, tmp_path / "shard-00000.h5", config, threads=1)
    assert all(row["status"] == "ok" for row in status)
    write_table(tmp_path / "features.tsv", status, extract.COLUMNS)
    write_index([tmp_path / "features.tsv"], tmp_path / "index.tsv")
    counts = build(raw, "class_folders", tmp_path / "index.tsv", tmp_path / "instructions", val_fraction=0.25,
                   seed=0, options=Options())
    assert counts["val"]["videos"] >= 16 and counts["rejected"] == 0

    settings = stage_settings(tmp_path, tiny_llm_dir, tmp_path / "instructions", "probe", llm_training="full",
                              mm_projector_type="mlp2x_gelu", features_index=str(tmp_path / "index.tsv"),
                              epochs=25, batch_size=8, learning_rate=3e-3, save_steps=1000, deepspeed=None)
    done = run_stage_process(tmp_path, settings)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, wrong = _answers(tmp_path, tmp_path / "probe" / "model", index=tmp_path / "index.tsv")
    assert metrics["exact_match"] >= 0.95, (metrics, wrong[:8])


# A UMT-L of 2 blocks, width 32, 32 px frames in 4 px patches: 64 tokens a frame, which the ToMe connector merges
# to 16 a frame in clips of 4 frames.
TINY_UMT = {"backend": "umt", "model": "umt-l", "pretrained": None, "seed": 0, "layer": -1,
            "overrides": {"dim": 32, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 4,
                          "pretrain_image_size": 32}}


def test_online_vision_with_a_tower_trained_from_random_weights_and_token_merging_names_the_colour(
        tmp_path, tiny_llm_dir, probe_videos):
    raw, rows = probe_videos
    write_table(tmp_path / "videos.tsv", rows, VIDEO_COLUMNS)
    counts = build(raw, "class_folders", tmp_path / "videos.tsv", tmp_path / "instructions", val_fraction=0.25,
                   seed=0, options=Options())
    assert counts["val"]["videos"] >= 16 and counts["rejected"] == 0
    settings = stage_settings(tmp_path, tiny_llm_dir, tmp_path / "instructions", "online", llm_training="full",
                              vision="online", vision_tower=TINY_UMT, vision_tower_training="full",
                              mm_projector_type="tome16_mlp_hd64", frames={"sampling": "midpoints", "num_frames": 4},
                              features_index=None, videos=str(tmp_path / "videos.tsv"), dataloader_workers=1,
                              epochs=25, batch_size=8, learning_rate=3e-3, save_steps=1000, deepspeed=None,
                              max_length=192)
    done = run_stage_process(tmp_path, settings)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics, wrong = _answers(tmp_path, tmp_path / "online" / "model", videos=tmp_path / "videos.tsv")
    assert metrics["exact_match"] >= 0.95, (metrics, wrong[:8])
