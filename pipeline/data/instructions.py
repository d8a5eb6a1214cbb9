"""Stage 5, instructions: one dataset's annotations -> validated LLaVA conversation records, joined with the
features, split into train and val by video.

The converter of the dataset's format (:mod:`pipeline.data.formats`) reads the files as the system publishes them;
every record then passes the same checks: conversations alternate human/gpt from a human turn and end with an
answer, no value is empty, ``<video>`` appears once, in the first human turn, no record repeats another exactly, the
video has features (a failed or missing video has none), and timestamps lie within the video. A record that fails
goes to ``rejected.jsonl`` with the file, its index or id, the field and the reason; ``counts.json`` sums kept and
rejected records by kind. Good records are never dropped because of a bad neighbour.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from collections import Counter
from pathlib import Path

from pipeline import VIDEO_TOKEN, configure_logging
from pipeline.data.formats import FORMATS, Options
from pipeline.io import atomic_path, read_table, write_json

log = logging.getLogger(__name__)


def check_record(record: dict) -> str | None:
    """Why a converted record is not a valid video conversation, or ``None``.

    Checks: ``conversations`` alternate ``human``/``gpt`` starting with ``human`` and ending with ``gpt``, every
    value is a non-empty string, and ``<video>`` appears exactly once, in the first human turn.
    """
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2 or len(turns) % 2:
        return "conversations: need human/gpt pairs"
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            return f"conversations[{i}].from: expected {expected!r}"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f"conversations[{i}].value: empty" + (" answer" if expected == "gpt" else "")
    markers = [turn["value"].count(VIDEO_TOKEN) for turn in turns]
    if markers[0] != 1 or sum(markers) != 1:
        return f"conversations: {VIDEO_TOKEN} must appear once, in the first human turn (found {markers})"
    return None


def split_by_video(videos: list[str], val_fraction: float, seed: int) -> set[str]:
    """The videos of the val split: ``ceil(val_fraction * n)`` of the ``n`` distinct videos, drawn with ``seed``.

    At least one video stays in train; with ``val_fraction > 0`` and two or more videos, at least one goes to val.
    """
    distinct = sorted(set(videos))
    if val_fraction <= 0 or len(distinct) < 2:
        return set()
    count = min(len(distinct) - 1, max(1, math.ceil(val_fraction * len(distinct))))
    return set(random.Random(seed).sample(distinct, count))


def _index(path: str | Path) -> dict[str, float | None]:
    """video_id -> duration in seconds (None when unknown) of every video with features."""
    table = read_table(path)
    durations = table["duration"] if "duration" in table else [""] * len(table)
    return {video: float(d) if d not in ("", None) else None for video, d in zip(table["video_id"], durations)}


def _problem(record: dict, videos: dict[str, float | None], seen: set) -> tuple[str, str] | None:
    """``(kind, reason)`` of a converted record that cannot be kept, or None."""
    reason = check_record(record)
    if reason:
        return ("empty answer" if "empty answer" in reason else "invalid conversation"), reason
    if record["video"] not in videos:
        return "no features", f"video: no features for {record['video']!r} (failed or missing video)"
    duration = videos[record["video"]]
    stamps = record.get("timestamps", {})
    late = [t for t in stamps.get("src", []) + stamps.get("tgt", []) if duration is not None and t > duration + 0.5]
    if late:
        return "timestamp outside the video", f"timestamps: {late[0]} s beyond the video's {duration} s"
    key = json.dumps([record["video"], record["conversations"]], sort_keys=True)
    if key in seen:
        return "duplicate", f"record repeats an earlier one exactly (video {record['video']!r})"
    seen.add(key)
    return None


def build(annotations: str | Path, fmt: str, index: str | Path, out_dir: str | Path, val_fraction: float, seed: int,
          options: Options | None = None) -> dict:
    """Convert, check, join with the features index and split; write ``train.json``, ``val.json``,
    ``rejected.jsonl`` and ``counts.json`` to ``out_dir``. Returns the counts.

    Raises:
        ValueError: unknown ``fmt``, or the annotation file is not a list of entries.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; known: {sorted(FORMATS)}")
    options = options or Options()
    videos = _index(index)
    kept, rejected, seen, ids, entries = [], [], set(), Counter(), 0
    for converted in FORMATS[fmt](Path(annotations), options):
        entries += 1
        record = converted.record
        problem = (converted.kind, converted.reason) if record is None else _problem(record, videos, seen)
        if problem:
            rejected.append({"where": converted.where, "kind": problem[0], "reason": problem[1],
                             "entry": converted.entry})
            continue
        ids[record["id"]] += 1
        if ids[record["id"]] > 1:  # ids are the records' names in logs and predictions: keep them unique
            record["id"] = f"{record['id']}#{ids[record['id']]}"
        kept.append(record)
    val_videos = split_by_video([r["video"] for r in kept], val_fraction, seed)
    splits = {"train": [r for r in kept if r["video"] not in val_videos],
              "val": [r for r in kept if r["video"] in val_videos]}
    out_dir = Path(out_dir)
    for name, records in splits.items():
        write_json(out_dir / f"{name}.json", records)
    with atomic_path(out_dir / "rejected.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rejected),
                       encoding="utf-8")
    counts = {
        "annotations": entries,
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["kind"] for r in rejected).most_common()),
        **{name: {"records": len(records), "videos": len({r["video"] for r in records})}
           for name, records in splits.items()},
    }
    write_json(out_dir / "counts.json", counts)
    log.info("%s (%s): %d kept (%d train, %d val), %d rejected %s", annotations, fmt, len(kept),
             len(splits["train"]), len(splits["val"]), len(rejected), counts["rejected_by_reason"])
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.instructions --annotations A --format F --index I --out-dir D``: the
    instructions rule of one dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True, help="the annotation file (class_folders: the folder)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--index", required=True, help="the features index")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="JSON of pipeline.data.formats.Options fields")
    args = parser.parse_args(argv)
    options = Options(**{**json.loads(args.options), "seed": args.seed})
    build(args.annotations, args.format, args.index, args.out_dir, args.val_fraction, args.seed, options)
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
