"""``python -m pipeline.chat``: a tiny stage folder (the tiny Llama, a random connector, the tiny open_clip tower)
written as a training stage writes it, asked about a real clip."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_CLIP, package_file

from pipeline.chat import VIDEO_ID, VideoChat, main
from pipeline.eval.generate import GenerationSettings
from pipeline.io import read_yaml, write_yaml

COMPRESS = {"fps": 3, "size": 64, "crf": 23, "preset": "veryfast"}  # small frames: a fast encode


def write_stage(folder, llm_dir, **stage):
    """A stage's folder as the training stage writes it (untrained: a random connector), its settings resolved
    from a workflow config with the tiny tower's features section and ``stage``'s own settings."""
    from pipeline.model.checkpoint import save_trained, write_stage_folder
    from pipeline.train.config import StageConfig, resolve_stage
    from pipeline.train.trainer import build_model, stage_tokenizer, stage_tower

    config = {"llm": {"name_or_path": str(llm_dir), "template": "chatml"},
              "model": {"mm_projector_type": "linear"}, "features": TINY_CLIP, "compress": COMPRESS,
              "stages": [{"name": "chat", "init": None, "train": {"connector": "full", "llm": "frozen"},
                          "report_to": [], **stage}]}
    settings = StageConfig.from_dict(resolve_stage(config, "chat"))
    tokenizer, base_vocab = stage_tokenizer(settings, str(llm_dir))
    tower = stage_tower(settings, str(llm_dir)) if settings.vision == "online" else None
    model, meta = build_model(settings, str(llm_dir), 64, tokenizer, base_vocab, tower)
    save_trained(model, folder, meta)
    write_stage_folder(folder, meta, tokenizer)
    write_yaml(folder / "stage.yaml", settings.to_dict())
    return folder


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory, tiny_llm_dir):
    """A cached stage's folder."""
    return write_stage(tmp_path_factory.mktemp("stage") / "model", tiny_llm_dir)


@pytest.fixture(scope="module")
def chat(stage_dir):
    return VideoChat(stage_dir, GenerationSettings(max_new_tokens=6))


def _files(*folders):
    return {folder: sorted(os.listdir(folder)) for folder in folders}


def _chat_command(tmp_path, *args):
    """Run ``python -m pipeline.chat`` in an empty working directory with its own TMPDIR."""
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    tmp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}
    done = subprocess.run([sys.executable, "-m", "pipeline.chat", *map(str, args)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    return done, work, tmp


def test_the_stage_folder_records_the_features_and_compress_settings(stage_dir):
    settings = read_yaml(stage_dir / "stage.yaml")
    assert settings["features"] == {key: TINY_CLIP[key] for key in ("sampling", "num_frames", "pooling")}
    assert settings["compress"] == COMPRESS


def test_a_stage_records_every_setting_that_shapes_its_features_and_its_videos():
    from pipeline.features.extract import FeatureConfig
    from pipeline.shards import settings_of
    from pipeline.train.config import COMPRESS_KEYS, FEATURE_KEYS, TOWER_KEYS
    from pipeline.video.ffmpeg import Encoding

    stamp = settings_of(FeatureConfig())  # what the features rule's output depends on
    flat = {*stamp["encoder"], *("sampling" if key == "method" else key for key in stamp["sampling"]),
            *set(stamp) - {"encoder", "sampling"}}
    assert set(TOWER_KEYS) | set(FEATURE_KEYS) == flat
    assert set(COMPRESS_KEYS) == set(settings_of(Encoding())) - {"max_decode_errors", "audio"}  # compress: no audio


def test_one_question_as_json_about_a_real_clip_leaves_no_file_behind(tmp_path, stage_dir, bikes_clip):
    videos = tmp_path / "videos"
    videos.mkdir()
    video = shutil.copy(bikes_clip, videos / "bikes.mp4")
    done, work, tmp = _chat_command(tmp_path, "--stage", stage_dir, "--video", video, "--question",
                                    "What happens in the video?", "--json", "--max-new-tokens", 4)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert set(out) == {"stage", "video", "question", "answer", "timings"}
    assert (out["stage"], out["video"], out["question"]) == (str(stage_dir), str(video), "What happens in the video?")
    assert isinstance(out["answer"], str)
    timings = out["timings"]
    assert set(timings) == {"load_s", "prepare_s", "first_token_s", "total_s"}
    assert all(value > 0 for value in timings.values())
    assert timings["total_s"] >= timings["load_s"] + timings["prepare_s"] + timings["first_token_s"]
    assert _files(videos, work, tmp) == {videos: ["bikes.mp4"], work: [], tmp: []}


def test_a_video_prepared_in_memory_gets_the_features_rules_tokens(tmp_path, chat, bikes_clip):
    from pipeline.data.dataset import CachedVisuals
    from pipeline.features.extract import COLUMNS, FeatureConfig, extract_shard
    from pipeline.features.store import FeatureStore, write_index
    from pipeline.io import write_table
    from pipeline.video.ffmpeg import encode

    prepared = chat.prepare(bikes_clip)
    compressed = tmp_path / "bikes.mp4"  # what the compress rule writes with the stage's settings
    fields = encode({"path": str(bikes_clip)}, compressed, chat.encoding)
    section = {key: value for key, value in TINY_CLIP.items() if key != "resources"}  # as the features rule passes it
    status = extract_shard([{"video_id": VIDEO_ID, "path": str(compressed), "duration": fields["duration"]}],
                           tmp_path / "shard.h5", FeatureConfig.from_dict(section), threads=1)
    write_table(tmp_path / "status.tsv", status, COLUMNS)
    write_index([tmp_path / "status.tsv"], tmp_path / "index.tsv")
    rule = CachedVisuals(FeatureStore(tmp_path / "index.tsv"))
    ours, theirs = prepared.load(VIDEO_ID), rule.load(VIDEO_ID)
    assert ours["video_features"].shape == theirs["video_features"].shape == (4 + 4, 64)
    assert ours["layout"] == theirs["layout"]
    np.testing.assert_allclose(ours["video_features"].float().numpy(), theirs["video_features"].float().numpy(),
                               rtol=1e-3, atol=1e-3)
    assert prepared.info(VIDEO_ID) == rule.info(VIDEO_ID)


def test_an_online_stage_gets_the_frames_its_evaluation_reads(tmp_path, tiny_llm_dir, bikes_clip):
    from pipeline.data.frames import online_visuals
    from pipeline.io import write_table
    from pipeline.video.ffmpeg import encode
    from pipeline.video.index import VIDEO_COLUMNS

    frames = {"sampling": "uniform", "num_frames": 3}
    online = write_stage(tmp_path / "model", tiny_llm_dir, vision="online", frames=frames)
    assert read_yaml(online / "stage.yaml")["features"] == {}
    chat = VideoChat(online, GenerationSettings(max_new_tokens=3))
    prepared = chat.prepare(bikes_clip)
    fields = encode({"path": str(bikes_clip)}, tmp_path / "bikes.mp4", chat.encoding)
    write_table(tmp_path / "videos.tsv", [{**fields, "video_id": VIDEO_ID, "path": str(tmp_path / "bikes.mp4")}],
                VIDEO_COLUMNS)
    rule = online_visuals(tmp_path / "videos.tsv", frames, chat.model.vision_tower, "crop")
    assert prepared.load(VIDEO_ID)["pixel_values"].shape == (3, 3, 32, 32)
    assert prepared.load(VIDEO_ID)["pixel_values"].equal(rule.load(VIDEO_ID)["pixel_values"])
    assert prepared.info(VIDEO_ID) == rule.info(VIDEO_ID)
    assert isinstance(chat.reply(prepared, [], "What happens?"), str)


@pytest.mark.parametrize("max_frames", [None, 3])
def test_tokens_in_memory_read_as_the_store_reads_them(tmp_path, max_frames):
    from pipeline.chat import _OneVideoStore
    from pipeline.data.dataset import CachedVisuals
    from pipeline.features.store import INDEX_COLUMNS, FeatureStore, ShardWriter
    from pipeline.io import write_table

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((6 * 2, 8)).astype(np.float16)  # 6 frames of 2 tokens
    indices, times = np.arange(0, 12, 2, dtype=np.int64), np.arange(6, dtype=np.float32) / 2
    with ShardWriter(tmp_path / "shard.h5", attrs={}) as writer:
        writer.add(VIDEO_ID, tokens, "frames", 6, 2, indices, times)
    row = {"video_id": VIDEO_ID, "path": str(tmp_path / "shard.h5"), "tokens": 12, "dim": 8, "duration": 3.0}
    write_table(tmp_path / "index.tsv", [row], INDEX_COLUMNS)
    stored = CachedVisuals(FeatureStore(tmp_path / "index.tsv"), max_frames)
    memory = CachedVisuals(_OneVideoStore(tokens, "frames", 6, 2, indices, times, tmp_path / "index.tsv"), max_frames)
    assert memory.info(VIDEO_ID) == stored.info(VIDEO_ID)
    ours, theirs = memory.load(VIDEO_ID), stored.load(VIDEO_ID)
    assert ours["layout"] == theirs["layout"] == ((max_frames or 6), 2)
    assert ours["video_features"].equal(theirs["video_features"])


def test_a_conversation_streams_its_answers_and_carries_the_earlier_turns(chat, bikes_clip):
    prepared = chat.prepare(bikes_clip)
    pieces: list[str] = []
    first = chat.reply(prepared, [], "What happens?", pieces.append)
    assert "".join(pieces).strip() == first
    assert 0 < chat.timings["first_token_s"] <= chat.timings["reply_s"]
    assert chat.reply(prepared, [], "What happens?") == first  # greedy
    second = chat.reply(prepared, [("What happens?", first)], "And <video> then?")  # one video, one place
    assert isinstance(second, str)


def test_the_terminal_conversation_answers_each_line_until_an_empty_one(monkeypatch, capsys, stage_dir, bikes_clip):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What happens?\nAnd then?\n\nnever asked\n"))
    assert main(["--stage", str(stage_dir), "--video", str(bikes_clip), "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("you> ") == 3 and out.count("chat> ") == 2  # the stage's name


@pytest.mark.parametrize("container", ["webm", "mp4", "mkv", "ogv", "avi", "mov", "flv", "mpg", "wmv"])
def test_a_clip_in_each_container_iscc_samples_ships_is_answered(chat, container):
    video = package_file("iscc_samples", f"files/video/demo.{container}")
    prepared = chat.prepare(video)
    assert prepared.load(VIDEO_ID)["video_features"].shape == (4 + 4, 64)  # T + S tokens of the tiny tower
    assert 50 < prepared.info(VIDEO_ID).duration < 70  # the same minute-long clip in each
    assert isinstance(chat.reply(prepared, [], "What happens?"), str)


def test_a_text_file_named_mp4_is_one_error_line_and_exit_code_2(tmp_path, stage_dir):
    video = tmp_path / "x.mp4"
    video.write_text("just some notes, not a video\n")
    done, _, _ = _chat_command(tmp_path, "--stage", stage_dir, "--video", video, "--question", "What?")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {video}: not a video: text, starting 'just some notes, not a video'"]
    assert done.stdout == ""


def test_a_stage_trained_before_the_features_settings_were_recorded_is_named(tmp_path, stage_dir):
    old = shutil.copytree(stage_dir, tmp_path / "model")
    settings = read_yaml(old / "stage.yaml")
    del settings["features"]
    write_yaml(old / "stage.yaml", settings)
    with pytest.raises(ValueError, match=r"stage.yaml: records no features settings"):
        VideoChat(old)
