import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_CLIP
from videochatgpt_reference import videochatgpt_features

from pipeline.features import extract
from pipeline.features.encoder import FrameEncoder
from pipeline.features.extract import FeatureConfig
from pipeline.features.pooling import frame_tokens, videochatgpt_pool
from pipeline.features.store import FeatureStore, write_index
from pipeline.io import write_table
from pipeline.video.frames import FrameSampling, read_frames

OPEN_CLIP = FeatureConfig.from_dict(TINY_CLIP)


def _store(shard, status) -> FeatureStore:
    """A FeatureStore over one shard file and its status rows (as the features_index rule builds it)."""
    table = shard.with_suffix(".tsv")
    write_table(table, status, extract.COLUMNS)
    write_index([table], shard.with_suffix(".index.tsv"))
    return FeatureStore(shard.with_suffix(".index.tsv"))


def _hf_config(folder, **changes) -> FeatureConfig:
    return FeatureConfig.from_dict({"backend": "hf_clip", "model": str(folder), "pretrained": "local", "layer": -2,
                                    "resize": "stretch", "sampling": "videochatgpt", "num_frames": 100,
                                    "pooling": "videochatgpt", "temporal_tokens": 100, "batch_size": 32,
                                    "workers": 0, **changes})


@pytest.mark.parametrize("method, total, expected", [
    ("uniform", 10, [0, 3, 6, 9]),
    ("midpoints", 100, [12, 37, 62, 87]),
    ("midpoints", 3, [0, 1, 1, 2]),
    ("videochatgpt", 10, [1, 3, 5, 8]),  # edges 0, 2, 4, 7, 9: np.round(4.5) is 4 (half to even)
    ("videochatgpt", 3, [0, 1, 1]),  # fewer frames than asked: each frame once, never more than the video has
])
def test_frame_sampling(method, total, expected):
    assert FrameSampling(method, num_frames=4).indices(total, 25.0).tolist() == expected


def test_fps_sampling_follows_the_duration_within_bounds():
    one_per_second = FrameSampling("fps", fps=1.0, min_frames=4, max_frames=8)
    assert len(one_per_second.indices(25 * 6, 25.0)) == 6  # 6 s of video, 1 fps
    assert len(one_per_second.indices(25 * 2, 25.0)) == 4  # at least min_frames
    assert len(one_per_second.indices(25 * 60, 25.0)) == 8  # at most max_frames
    with pytest.raises(ValueError, match="unknown 'random'"):
        FrameSampling("random")


def test_videochatgpt_pooling_pads_temporal_rows_and_averages_real_frames():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (T=2, S=3, D=4)
    pooled = videochatgpt_pool(tokens, temporal_tokens=5)
    assert pooled.shape == (5 + 3, 4) and pooled.dtype == torch.float16
    assert torch.equal(pooled[0], tokens[0].mean(0).half()) and torch.equal(pooled[1], tokens[1].mean(0).half())
    assert not pooled[2:5].any()  # padding rows
    assert torch.equal(pooled[5:], ((tokens[0] + tokens[1]) / 2).half())  # spatial: the 2 real frames only


def test_frame_tokens_pool_each_frame_over_2x2_patches():
    tokens = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 16, 1)  # 2 frames of a 4 x 4 grid, D = 1
    pooled = frame_tokens(tokens, (4, 4), spatial_pool=2)
    assert pooled.shape == (2 * 4, 1)
    assert pooled[:4, 0].tolist() == [2.5, 4.5, 10.5, 12.5]  # mean of patches (0, 1, 4, 5), (2, 3, 6, 7), ...
    assert frame_tokens(tokens, (4, 4)).shape == (32, 1)
    with pytest.raises(ValueError, match="do not make a 3 x 3 grid"):
        frame_tokens(tokens, (3, 3))


def test_open_clip_and_hf_towers_give_penultimate_patch_tokens_without_cls(tiny_hf_clip_dir):
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 80, 3), dtype=np.uint8)
    encoder = FrameEncoder(OPEN_CLIP.encoder)
    assert (encoder.prep.size, encoder.dim, encoder.grid) == ((32, 32), 64, (2, 2))
    pixels = encoder.normalize(encoder.prep(frames))
    tokens = encoder.patch_tokens(encoder.prep(frames), batch_size=2)
    import open_clip

    torch.manual_seed(0)  # the same random tower, unpruned
    whole = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP["overrides"]).visual.eval()
    with torch.no_grad():
        blocks = whole.forward_intermediates(pixels, indices=[0, 1], output_fmt="NLC",
                                             intermediates_only=True)["image_intermediates"]
    assert tokens.shape == (3, 4, 64) and torch.allclose(tokens, blocks[0], atol=1e-5)  # block -2 of 2 is block 0
    assert len(encoder.tower.visual.transformer.resblocks) == 1  # the last block is pruned: it would never be used

    from transformers import CLIPVisionModel

    hf = FrameEncoder(_hf_config(tiny_hf_clip_dir).encoder)
    assert (hf.prep.size, hf.dim, hf.grid) == ((224, 224), 32, (16, 16))
    pixels = hf.normalize(hf.prep(frames))
    with torch.no_grad():
        hidden = CLIPVisionModel.from_pretrained(tiny_hf_clip_dir)(pixels, output_hidden_states=True).hidden_states
    assert torch.allclose(hf.patch_tokens(hf.prep(frames)), hidden[-2][:, 1:], atol=1e-6)


def test_same_seed_same_random_weights():
    a, b = FrameEncoder(OPEN_CLIP.encoder), FrameEncoder(OPEN_CLIP.encoder)
    assert all(torch.equal(x, y) for x, y in zip(a.tower.parameters(), b.tower.parameters()))


@pytest.mark.parametrize("clip_name", ["short_clip", "bikes_clip"])
def test_videochatgpt_recipe_matches_the_original_script(tmp_path, tiny_hf_clip_dir, clip_name, request):
    video = request.getfixturevalue(clip_name)
    reference = videochatgpt_features(video, tiny_hf_clip_dir)
    rows = [{"video_id": "v", "path": str(video)}]
    status = extract.extract_shard(rows, tmp_path / "s.h5", _hf_config(tiny_hf_clip_dir), threads=2)
    store = _store(tmp_path / "s.h5", status)
    ours = store.get("v")
    assert (store.info("v")["layout"], store.info("v")["S"]) == ("videochatgpt", 256)
    assert status[0]["tokens"] == 356 and ours.shape == reference.shape == (356, 32) and ours.dtype == np.float16
    assert np.abs(ours.astype(np.float32) - reference.astype(np.float32)).max() <= 1e-2


def test_extract_shard_writes_hdf5_index_and_failed_rows(tmp_path, short_clip):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    rows = [{"video_id": "band", "path": str(short_clip)}, {"video_id": "bad", "path": str(bad)}]
    out = tmp_path / "shard-00000.h5"
    status = extract.extract_shard(rows, out, FeatureConfig.from_dict({**TINY_CLIP, "workers": 2}), threads=1)
    assert [(r["video_id"], r["status"]) for r in status] == [("band", "ok"), ("bad", "failed")]
    assert status[1]["reason"].startswith("decode error")
    assert status[0]["tokens"] == 4 + 4 and status[0]["dim"] == 64
    assert not (tmp_path / "shard-00000.h5.partial").exists()
    with h5py.File(out) as f:
        assert f["video_ids"].asstr()[()].tolist() == ["band"] and f["features"].shape == (8, 64)
        assert f.attrs["encoder.backend"] == "open_clip" and f.attrs["pooling"] == "videochatgpt"
        assert json.loads(f.attrs["settings"])["sampling"]["num_frames"] == 4
    store = _store(out, status)
    assert "band" in store and "bad" not in store
    features, info = store.get("band"), store.info("band")
    assert features.shape == (8, 64) and features.dtype == np.float16 and np.isfinite(features).all()
    assert (info["layout"], info["T"], info["S"], len(info["frame_times"])) == ("videochatgpt", 4, 4, 4)


def test_per_frame_tokens_with_timestamps(tmp_path, short_clip):
    config = FeatureConfig.from_dict({**TINY_CLIP, "sampling": "fps", "fps": 2.0, "pooling": "frames"})
    status = extract.extract_shard([{"video_id": "v", "path": str(short_clip)}], tmp_path / "s.h5", config, 1)
    store = _store(tmp_path / "s.h5", status)
    info = store.info("v")
    assert (info["layout"], info["T"], info["S"]) == ("frames", 4, 4)  # 2 s at 2 fps, 2 x 2 patches
    assert store.get("v").shape == (4 * 4, 64)
    assert info["frame_times"].tolist() == pytest.approx([0.25, 0.75, 1.25, 1.75], abs=0.05)


def test_a_hung_decoder_fails_only_its_video(tmp_path, short_clip, monkeypatch):
    real = extract.read_frames

    def slow(path, *sampling):
        if "hung" in str(path):
            time.sleep(60)
        return real(path, *sampling)

    monkeypatch.setattr(extract, "read_frames", slow)  # the forked DataLoader workers inherit it
    hung = tmp_path / "hung.mp4"
    hung.write_bytes(short_clip.read_bytes())
    rows = [{"video_id": "a", "path": str(short_clip)}, {"video_id": "hung", "path": str(hung)},
            {"video_id": "b", "path": str(short_clip)}]
    config = FeatureConfig.from_dict({**TINY_CLIP, "workers": 1, "decode_timeout": 3})
    status = extract.extract_shard(rows, tmp_path / "s.h5", config, threads=1)
    assert [r["status"] for r in status] == ["ok", "failed", "ok"]
    assert status[1]["reason"] == "decode timed out after 3 s"


def test_pyav_reads_what_decord_cannot(short_clip, monkeypatch):
    sampling = FrameSampling("midpoints", num_frames=5)
    expected, indices, times = read_frames(short_clip, sampling)
    import decord

    def broken(*args, **kwargs):
        raise RuntimeError("Error reading (simulated decord failure)")

    monkeypatch.setattr(decord, "VideoReader", broken)
    frames, fallback_indices, fallback_times = read_frames(short_clip, sampling)
    assert np.array_equal(fallback_indices, indices) and np.allclose(fallback_times, times, atol=0.05)
    assert frames.shape == expected.shape and np.abs(frames.astype(int) - expected).mean() < 1.0


def _killed_after(monkeypatch, video: str):
    """Make the features job die (as a kill would: not an error of one video) when it reaches ``video``."""
    real = extract.read_frames

    def read(path, *sampling):
        if video in str(path):
            raise SystemExit("killed")
        return real(path, *sampling)

    monkeypatch.setattr(extract, "read_frames", read)


def _clips(tmp_path, short_clip, names):
    rows = []
    for name in names:
        path = tmp_path / f"{name}.mp4"
        path.write_bytes(short_clip.read_bytes())
        rows.append({"video_id": name, "path": str(path)})
    return rows


def test_a_resumed_shard_does_not_redo_finished_videos(tmp_path, short_clip, monkeypatch):
    out, partial = tmp_path / "s.h5", tmp_path / "s.h5.partial"
    rows = _clips(tmp_path, short_clip, ["a", "b"])
    config = FeatureConfig.from_dict({**TINY_CLIP, "workers": 0})
    with monkeypatch.context() as m:
        _killed_after(m, "b.mp4")
        with pytest.raises(SystemExit):
            extract.extract_shard(rows, out, config, threads=1)
    assert not out.exists() and sorted(p.name for p in partial.iterdir()) == [".settings.json", "features.h5"]
    calls = []
    real = extract.read_frames
    monkeypatch.setattr(extract, "read_frames", lambda path, *s: calls.append(path) or real(path, *s))
    status = extract.extract_shard(rows, out, FeatureConfig.from_dict({**TINY_CLIP, "workers": 2}), threads=1)
    assert calls == [] or [Path(c).name for c in calls] == ["b.mp4"]  # workers: decoded in other processes
    assert [r["status"] for r in status] == ["ok", "ok"] and not partial.exists()
    store = _store(out, status)
    assert np.array_equal(store.get("a"), store.get("b"))  # the same clip: the same tokens, resumed or not


def test_a_video_damaged_by_the_kill_is_redone_not_trusted(tmp_path, short_clip, monkeypatch):
    out, partial = tmp_path / "s.h5", tmp_path / "s.h5.partial"
    rows = _clips(tmp_path, short_clip, ["a", "b", "c"])
    config = FeatureConfig.from_dict({**TINY_CLIP, "workers": 0})
    with monkeypatch.context() as m:
        _killed_after(m, "c.mp4")
        with pytest.raises(SystemExit):
            extract.extract_shard(rows, out, config, threads=1)
    with h5py.File(partial / "features.h5", "r+") as f:  # b's rows half-written when the job died
        f["features"][f["offsets"][1] + 1] = 7.0
    decoded = []
    real = extract.read_frames
    monkeypatch.setattr(extract, "read_frames", lambda path, *s: decoded.append(Path(path).name) or real(path, *s))
    status = extract.extract_shard(rows, out, config, threads=1)
    assert decoded == ["b.mp4", "c.mp4"]  # a verified and kept; b and what follows redone
    store = _store(out, status)
    assert np.array_equal(store.get("a"), store.get("b")) and np.array_equal(store.get("b"), store.get("c"))


def _leaves(obj, prefix=()):
    """(path, value) of every leaf field of a dataclass config, runtime fields included."""
    import dataclasses

    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, prefix + (f.name,))
        else:
            yield prefix + (f.name,), f.metadata.get("runtime", False)


def _changed(config, path):
    import dataclasses

    head, *rest = path
    value = getattr(config, head)
    if rest:
        return dataclasses.replace(config, **{head: _changed(value, rest)})
    other = {str: lambda v: (v or "") + "x", bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v + 0.5,
             dict: lambda v: {**v, "x": 1}, type(None): lambda v: 3}[type(value)](value)
    return dataclasses.replace(config, **{head: other}) if head not in ("method", "backend", "resize", "precision",
                                                                           "pooling") else _enum(config, head)


def _enum(config, name):
    import dataclasses

    choices = {"method": ("uniform", "fps"), "backend": ("hf_clip", "open_clip"), "resize": ("stretch", "crop"),
               "precision": ("float16", "float32"), "pooling": ("frames", "videochatgpt")}[name]
    current = getattr(config, name)
    return dataclasses.replace(config, **{name: choices[0] if current != choices[0] else choices[1]})


def test_every_setting_that_shapes_the_features_redoes_finished_videos(tmp_path):
    """Each field of FeatureConfig (the encoder's, the sampling's, the pooling's): a partial shard made with one
    value is discarded when the field changes; the runtime fields (batch size, workers, timeout) keep it."""
    from pipeline.features.store import FeatureShard
    from pipeline.shards import ShardTask, prepare_partial, settings_of

    rows = [{"video_id": "a", "path": "a.mp4"}]

    def kept(config) -> bool:
        """Whether a partial shard left under OPEN_CLIP's settings survives a rerun with ``config``'s."""
        def partial(settings):
            task = ShardTask(produce=None, settings={"stage": "features", **settings}, outputs=FeatureShard({}))
            return prepare_partial(tmp_path / "s.h5", task, rows)

        (partial(settings_of(OPEN_CLIP)) / "features.h5").write_text("a finished video")
        return (partial(settings_of(config)) / "features.h5").exists()

    leaves = list(_leaves(OPEN_CLIP))
    assert {p[-1] for p, runtime in leaves if runtime} == {"batch_size", "workers", "decode_timeout"}
    assert len(leaves) == 19
    for path, runtime in leaves:
        assert kept(_changed(OPEN_CLIP, path)) == runtime, path


def test_pickled_features_import_only_when_trusted(tmp_path):
    import pickle

    from pipeline.features.import_pickle import import_pickles, main

    folder = tmp_path / "clip_features"
    folder.mkdir()
    good = np.random.default_rng(0).standard_normal((356, 8)).astype(np.float16)
    for name, value in (("v_good", good), ("v_short", good[:50]), ("v_text", "hello")):
        with open(folder / f"{name}.pkl", "wb") as handle:
            pickle.dump(value, handle)
    with pytest.raises(PermissionError, match="runs any code"):
        import_pickles(folder, tmp_path / "x.h5", trusted=False)
    with pytest.raises(SystemExit):  # the command refuses without --trust-pickle
        main(["--features-dir", str(folder), "--out", str(tmp_path / "x.h5"), "--status", str(tmp_path / "x.tsv")])
    assert not (tmp_path / "x.h5").exists()
    status = {r["video_id"]: r for r in import_pickles(folder, tmp_path / "s.h5", trusted=True)}
    assert status["v_good"]["status"] == "ok" and status["v_good"]["tokens"] == 356
    assert "more than 100 rows" in status["v_short"]["reason"] and status["v_text"]["status"] == "failed"
    store = _store(tmp_path / "s.h5", list(status.values()))
    assert np.array_equal(store.get("v_good"), good) and "v_short" not in store
    assert (store.info("v_good")["T"], store.info("v_good")["S"]) == (100, 256)


def test_a_stage_takes_fewer_evenly_spaced_frames_of_per_frame_tokens(tmp_path):
    from pipeline.features.store import INDEX_COLUMNS, ShardWriter

    frames = np.arange(6 * 2 * 3, dtype=np.float16).reshape(6, 2, 3)  # T = 6 frames of S = 2 tokens, D = 3
    pooled = np.ones((5, 3), dtype=np.float16)
    with ShardWriter(tmp_path / "s.h5", attrs={}) as writer:
        writer.add("per_frame", frames.reshape(12, 3), "frames", 6, 2)
        writer.add("pooled", pooled, "videochatgpt", 3, 2)
    write_table(tmp_path / "index.tsv", [{"video_id": v, "path": str(tmp_path / "s.h5"), "tokens": n, "dim": 3}
                                         for v, n in (("per_frame", 12), ("pooled", 5))], INDEX_COLUMNS)
    store = FeatureStore(tmp_path / "index.tsv")
    assert np.array_equal(store.get("per_frame", 3), frames[[0, 2, 5]].reshape(6, 3))
    assert store.rows("per_frame", 3) == 6 and store.rows("per_frame", 8) == store.rows("per_frame") == 12
    assert np.array_equal(store.get("per_frame", 8), frames.reshape(12, 3))
    assert np.array_equal(store.get("pooled", 1), pooled) and store.rows("pooled", 1) == 5  # not per frame: whole


def _two_shards(tmp_path):
    """Two shard files of three videos each, their status tables and index; returns (shards, index)."""
    from pipeline.features.store import ShardWriter

    rng = np.random.default_rng(0)
    shards, tables = [], []
    for s in range(2):
        path = tmp_path / f"shard-{s:05d}.h5"
        rows = []
        with ShardWriter(path, {}) as writer:
            for v in range(3):
                video = f"s{s}v{v}"
                writer.add(video, rng.standard_normal((5 + s, 4)).astype(np.float16), "videochatgpt", 1, 4 + s)
                rows.append({"video_id": video, "status": "ok", "path": str(path), "tokens": 5 + s, "dim": 4})
        write_table(path.with_suffix(".tsv"), rows, extract.COLUMNS)
        shards.append(path)
        tables.append(path.with_suffix(".tsv"))
    write_index(tables, tmp_path / "index.tsv")
    return shards, tables, tmp_path / "index.tsv"


def test_a_damaged_features_shard_is_named_with_its_video(tmp_path):
    from pipeline.features.store import ShardError

    shards, tables, index = _two_shards(tmp_path)
    assert len(FeatureStore(index)) == 6
    good = shards[0].read_bytes()

    shards[0].write_bytes(b"garbage" * 100)  # replaced by garbage
    for make in (lambda: write_index(tables, index), lambda: FeatureStore(index)):
        with pytest.raises(ShardError, match=f"{shards[0]}: not a readable features shard"):
            make()

    shards[0].write_bytes(good[: len(good) - 300])  # truncated
    with pytest.raises(ShardError, match=f"{shards[0]}: "):
        FeatureStore(index)

    shards[0].write_bytes(good)
    with h5py.File(shards[0], "r+") as f:  # one video's bytes changed on disk
        f["features"][7] = f["features"][7] + 1
    with pytest.raises(ShardError, match=r"video 's0v1' is damaged \(checksum mismatch\)"):
        write_index(tables, index)

    shards[0].write_bytes(good)
    a, b = shards[0].read_bytes(), shards[1].read_bytes()  # two shards swapped
    shards[0].write_bytes(b)
    shards[1].write_bytes(a)
    with pytest.raises(ShardError, match=f"{shards[0]}: has no video 's0v0'.*files swapped"):
        FeatureStore(index)

    shards[0].write_bytes(good)
    shards[1].unlink()  # deleted
    with pytest.raises(ShardError, match=f"{shards[1]}: missing"):
        FeatureStore(index)


def test_reads_span_chunks_exactly(tmp_path, monkeypatch):
    from pipeline.features import store as store_module

    monkeypatch.setattr(store_module, "CHUNK_BYTES", 3 * 4 * 2)  # chunks of 3 rows of 4 float16
    rng = np.random.default_rng(1)
    videos = {f"v{i}": rng.standard_normal((n, 4)).astype(np.float16) for i, n in enumerate((2, 5, 1, 7))}
    path = tmp_path / "s.h5"
    with store_module.ShardWriter(path, {}) as writer:
        for i, (video, tokens) in enumerate(videos.items()):
            writer.add(video, tokens, "videochatgpt", 1, len(tokens) - 1)
            writer.file.create_dataset(f"gap{i}", data=np.zeros(5))  # space between the chunks in the file
    with h5py.File(path) as f:
        assert f["features"].chunks == (3, 4) and f["features"].shape == (15, 4)
    assert len(store_module._Shard(str(path)).segments) > 1  # reads cross runs of chunks, not only chunks
    store = _store(path, [{"video_id": v, "status": "ok", "path": str(path), "tokens": len(t), "dim": 4}
                          for v, t in videos.items()])
    for video, tokens in videos.items():
        assert np.array_equal(store.get(video), tokens)
