"""Conversion at VideoInstruct-100K's size: 100,000 QA pairs over 11,000 videos through the instructions stage.

Generates the annotation file (Video-ChatGPT's format, some answers ending in its GPT debris, one bad entry in a
thousand) and a features index of every video, then times ``pipeline.data.instructions.build`` (conversion,
checks, join, split, writing) in this process, median of 3. Tokenisation is not part of it: it happens lazily in
training.

    python benchmarks/convert_scale.py [--records 100000] [--videos 11000]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.instructions import build  # noqa: E402
from pipeline.features.store import INDEX_COLUMNS  # noqa: E402
from pipeline.io import write_table  # noqa: E402


def annotations(path: Path, records: int, videos: int) -> None:
    rng = random.Random(0)
    entries = []
    for i in range(records):
        video = f"v_{i % videos:011d}"
        answer = " ".join(rng.choice(("the", "man", "plays", "a", "guitar", "on", "stage", "while", "people", "watch"))
                          for _ in range(rng.randint(8, 40))) + "."
        if i % 50 == 0:
            answer += "\nQA_GT_caption_based_noisy"
        entry = {"video_id": video, "q": f"What happens in the video, question {i}?", "a": answer}
        if i % 1000 == 999:
            del entry["a"]
        entries.append(entry)
    path.write_text(json.dumps(entries))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--videos", type=int, default=11_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        annotations(work / "VideoInstruct100K.json", args.records, args.videos)
        write_table(work / "index.tsv", [{"video_id": f"v_{v:011d}", "path": "shard.h5", "tokens": 356, "dim": 1024,
                                          "duration": 120.0} for v in range(args.videos)], INDEX_COLUMNS)
        times = []
        for _ in range(3):
            start = time.perf_counter()
            counts = build(work / "VideoInstruct100K.json", "videochatgpt_qa", work / "index.tsv", work / "out", 0.1, 0)
            times.append(time.perf_counter() - start)
    size = args.records
    print(f"{size:,} records over {args.videos:,} videos: {statistics.median(times):.1f} s (median of 3), "
          f"{size / statistics.median(times):,.0f} records/s; kept {counts['kept']:,}, "
          f"rejected {counts['rejected_by_reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
