from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_CLIP

from pipeline.features import extract
from pipeline.features.encoder import EncoderConfig, FrameEncoder
from pipeline.features.pooling import pool, videochatgpt_pool
from pipeline.features.store import FeatureStore, write_index
from pipeline.io import write_table

ENCODER = EncoderConfig(**{k: TINY_CLIP[k] for k in ("backend", "model", "pretrained", "seed", "layer", "overrides")})


def test_videochatgpt_pooling_is_temporal_then_spatial_means():
    tokens = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (T=2, S=3, D=4)
    pooled = videochatgpt_pool(tokens)
    assert pooled.shape == (2 + 3, 4)
    assert torch.equal(pooled[0], tokens[0].mean(0)) and torch.equal(pooled[1], tokens[1].mean(0))
    assert torch.equal(pooled[2:], (tokens[0] + tokens[1]) / 2)
    with pytest.raises(ValueError):
        pool(tokens, "nope")


def test_tiny_open_clip_tower_gives_penultimate_patch_tokens_without_cls(short_clip):
    encoder = FrameEncoder(ENCODER)
    assert (encoder.image_size, encoder.dim, encoder.num_patches) == ((32, 32), 64, 4)
    frames = np.random.default_rng(0).integers(0, 255, (3, 48, 80, 3), dtype=np.uint8)
    tokens = encoder.patch_tokens(frames, batch_size=2)
    assert tokens.shape == (3, 4, 64) and tokens.dtype == torch.float32
    with torch.no_grad():
        full = encoder.visual.forward_intermediates(encoder.preprocess(frames), indices=[0, 1], output_fmt="NLC",
                                                    intermediates_only=True)["image_intermediates"]
    assert torch.allclose(tokens, full[0], atol=1e-5)  # block -2 of 2 is block 0
    assert not torch.allclose(tokens, full[1])


def test_same_seed_same_random_weights():
    a, b = FrameEncoder(ENCODER), FrameEncoder(ENCODER)
    assert all(torch.equal(x, y) for x, y in zip(a.visual.parameters(), b.visual.parameters()))


def test_extract_shard_writes_hdf5_index_and_failed_rows(tmp_path, short_clip):
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    rows = [{"video_id": "band", "path": str(short_clip)}, {"video_id": "bad", "path": str(bad)}]
    out = tmp_path / "shard-00000.h5"
    status = extract.extract_shard(rows, out, TINY_CLIP, threads=1)
    assert [(r["video_id"], r["status"]) for r in status] == [("band", "ok"), ("bad", "failed")]
    assert status[1]["reason"].startswith("decode error")
    assert status[0]["tokens"] == 4 + 4 and status[0]["dim"] == 64
    assert not (tmp_path / "shard-00000.h5.partial").exists()
    with h5py.File(out) as f:
        assert list(f) == ["band"]
        data = f["band"]
        assert data.shape == (8, 64) and data.dtype == np.float16
        assert (data.attrs["T"], data.attrs["S"]) == (4, 4)
        assert len(data.attrs["frame_times"]) == 4
        assert f.attrs["encoder"] == "open_clip:ViT-B-32" and f.attrs["pooling"] == "videochatgpt"
    table = tmp_path / "shard-00000.tsv"
    write_table(table, status, extract.COLUMNS)
    assert write_index([table], tmp_path / "index.tsv") == 1
    store = FeatureStore(tmp_path / "index.tsv")
    assert "band" in store and "bad" not in store
    features = store.get("band")
    assert features.shape == (8, 64) and np.isfinite(features).all()


def test_a_resumed_shard_does_not_redo_finished_videos(tmp_path, short_clip, monkeypatch):
    out, partial = tmp_path / "s.h5", tmp_path / "s.h5.partial"
    rows = [{"video_id": "a", "path": str(short_clip)}, {"video_id": "b", "path": str(short_clip)}]
    with monkeypatch.context() as m:  # keep the partial folder, then make it what a job killed after "a" leaves
        m.setattr(extract, "shutil", SimpleNamespace(rmtree=lambda *a, **k: None))
        extract.extract_shard(rows, out, TINY_CLIP, threads=1)
    with h5py.File(out) as f:
        first = f["a"][()]
    out.unlink()
    (partial / "b.npz").unlink()

    calls = []
    real = extract.video_features
    monkeypatch.setattr(extract, "video_features", lambda enc, path, *a: calls.append(path) or real(enc, path, *a))
    status = extract.extract_shard(rows, out, TINY_CLIP, threads=1)
    assert len(calls) == 1  # only "b"
    assert [r["status"] for r in status] == ["ok", "ok"]
    assert not partial.exists()
    with h5py.File(out) as f:
        assert np.array_equal(f["a"][()], first) and np.array_equal(f["b"][()], first)
