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


# --- E.T. Chat: timestamps by matching ------------------------------------------------------------------------------

# EVA-ViT-G shrunk to 2 blocks of width 32, 32 px frames in 8 px patches (16 a frame), and E.T. Chat's Q-Former
# (question-conditioned, 4 queries, 2 layers of width 32) with its aggregator: one token a frame.
TINY_EVA = {"backend": "eva", "model": "eva_vit_g", "pretrained": None, "seed": 0, "layer": -1,
            "overrides": {"width": 32, "depth": 2, "heads": 2, "patch_size": 8, "image_size": 32, "mlp_ratio": 2.0}}
SECONDS = 8


def _square_video(path, start, end, rng, fps=4, size=32, side=14):
    """An 8 s, 4 fps VP9 webm of dark noise in which a bright square is visible from ``start`` to ``end`` seconds
    (the frames at those times included), at a random place."""
    x, y = rng.integers(0, size - side, 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(SECONDS * fps):
            image = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            if start <= i / fps < end + 1:
                image[y:y + side, x:x + side] = (240, 230, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_a_tiny_et_chat_grounds_when_a_square_appears_by_matching_frames(tmp_path, tiny_llm_dir):
    """E.T. Instruct-style records ("When does the square appear?" -> "From <vid> to <vid>.") through the real
    pipeline code: compression to 3 fps, EVA features of E.T. Chat's 1 fps frames from t = 0 (cached: its tower
    is frozen), the etchat format with timestamps kept as <vid> tokens, a stage with E.T. Chat's Q-Former and the
    matching head, generation that writes each matched frame's time, and E.T. Bench's tvg F1 at IoU 0.5 on
    held-out videos. Chance: a span drawn as the training spans are (start 1-4 s, 2-3 s long) scores F1 ~0.3 at
    IoU 0.5 on these videos (0.25, computed below; the trained model: 1.0); an answer without timestamps scores 0."""
    from conftest import tiny_bert_tokenizer

    from pipeline.eval.benchmarks.etbench import evaluate as etbench_scores
    from pipeline.io import read_json, write_json

    rng = np.random.default_rng(0)
    raw, compressed = tmp_path / "raw" / "squares", tmp_path / "compressed"
    raw.mkdir(parents=True)
    compressed.mkdir()
    entries, rows = [], []
    for i in range(48):
        start = int(rng.integers(1, 5))
        end = start + int(rng.integers(2, 4))
        _square_video(raw / f"clip{i:02d}.webm", start, end, rng)
        video_id = f"squares__clip{i:02d}"
        info = encode({"path": str(raw / f"clip{i:02d}.webm")}, compressed / f"{video_id}.mp4",
                      Encoding(fps=3, size=32, audio=False))
        rows.append({"video_id": video_id, "path": str(compressed / f"{video_id}.mp4"), "status": "ok", **info})
        entries.append({"task": "tvg", "source": "squares", "video": f"squares/clip{i:02d}.webm",
                        "duration": float(SECONDS), "tgt": [float(start), float(end)], "conversations": [
                            {"from": "human", "value": "<image>\nWhen does the square appear? Answer with a start "
                                                       "and end time."},
                            {"from": "gpt", "value": "From <vid> to <vid>."}]})
    write_json(tmp_path / "et_instruct_vid.json", entries)
    config = FeatureConfig.from_dict({**TINY_EVA, "sampling": "fps_from_start", "fps": 1.0, "pooling": "frames",
                                      "workers": 0, "batch_size": 16})
    status = extract.extract_shard(rows, tmp_path / "shard-00000.h5", config, threads=1)
    assert all(row["status"] == "ok" for row in status), status[:2]
    write_table(tmp_path / "features.tsv", status, extract.COLUMNS)
    write_index([tmp_path / "features.tsv"], tmp_path / "index.tsv")
    counts = build(tmp_path / "et_instruct_vid.json", "etchat", tmp_path / "index.tsv", tmp_path / "instructions",
                   val_fraction=0.25, seed=0, options=Options(root=str(tmp_path / "raw"), timestamps="tokens"))
    assert counts["rejected"] == 0 and counts["val"]["records"] >= 10

    bert = tiny_bert_tokenizer(tmp_path / "bert")
    settings = stage_settings(
        tmp_path, tiny_llm_dir, tmp_path / "instructions", "etchat", llm_training="full",
        mm_projector_type="etchat_qformer", features_index=str(tmp_path / "index.tsv"),
        connector={"tokenizer": str(bert), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                   "intermediate_size": 64, "num_query_tokens": 4},
        matching={"alpha": 2.0, "bidirectional_frames": True}, epochs=40, batch_size=8, learning_rate=3e-3,
        save_steps=1000, deepspeed=None, max_length=96)
    done = run_stage_process(tmp_path, settings)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluate(tmp_path / "etchat" / "model", [tmp_path / "instructions" / "val.json"], tmp_path / "index.tsv",
             tmp_path / "eval", max_new_tokens=8)
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    val = {record["id"]: record for record in read_json(tmp_path / "instructions" / "val.json")}
    scored = [{"version": 1.0, "idx": k, "task": "tvg", "source": "squares", "video": val[p["id"]]["video"],
               "duration": float(SECONDS), "tgt": val[p["id"]]["timestamps"]["tgt"], "q": p["question"],
               "a": p["prediction"]} for k, p in enumerate(predictions)]
    f1 = etbench_scores(scored, similarity=None)["metrics"]["tvg"]["squares"]["F1@0.5"]
    chance_rng = np.random.default_rng(1)
    chance = [{**s, "a": f"From {a} to {a + d}."} for s in scored
              for a, d in [(int(chance_rng.integers(1, 5)), int(chance_rng.integers(2, 4)))]]
    chance_f1 = etbench_scores(chance, similarity=None)["metrics"]["tvg"]["squares"]["F1@0.5"]
    assert f1 >= 0.8, (f1, chance_f1, [p["prediction"] for p in predictions[:6]])
