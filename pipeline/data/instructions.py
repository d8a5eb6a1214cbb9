"""Stage 5, instructions: annotation files -> validated LLaVA conversation records, joined with the features,
split into train and val by video.

Record format (LLaVA): ``{"id", "video", "conversations": [{"from": "human", "value": "<video>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``. A record that fails validation, or whose video has no features (a failed
or missing video), goes to ``rejected.jsonl`` with its reason; ``counts.json`` sums kept and rejected records.
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
from typing import Iterator

from pipeline import VIDEO_TOKEN, configure_logging
from pipeline.features.store import FeatureStore
from pipeline.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

FORMATS = ("videochatgpt_qa",)


def from_videochatgpt_qa(annotations: list) -> Iterator[tuple[int, dict | None, str]]:
    """Video-ChatGPT's VideoInstruct format: a JSON list of ``{"video_id", "q", "a"}``.

    One single-turn record per QA pair, ``id`` = ``<video_id>_<n>`` (n counts that video's pairs), the question
    after the ``<video>`` marker (Video-ChatGPT, ``scripts/convert_instruction_json_to_training_format.py``).

    Yields:
        ``(index, record, "")`` or ``(index, None, reason)`` for an entry that is not a dict with non-empty
        string ``video_id``, ``q`` and ``a`` (the reason names the field).
    """
    per_video: Counter = Counter()
    for index, entry in enumerate(annotations):
        if not isinstance(entry, dict):
            yield index, None, f"entry is a {type(entry).__name__}, not an object"
            continue
        bad = next((k for k in ("video_id", "q", "a") if not isinstance(entry.get(k), str) or not entry[k].strip()),
                   None)
        if bad:
            yield index, None, f"{bad}: missing or empty"
            continue
        video = entry["video_id"]
        n = per_video[video]
        per_video[video] += 1
        yield index, {
            "id": f"{video}_{n}",
            "video": video,
            "conversations": [
                {"from": "human", "value": f"{VIDEO_TOKEN}\n{entry['q'].strip()}"},
                {"from": "gpt", "value": entry["a"].strip()},
            ],
        }, ""


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
            return f"conversations[{i}].value: empty"
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


def build(annotations: str | Path, fmt: str, index: str | Path, out_dir: str | Path, val_fraction: float,
          seed: int) -> dict:
    """Convert, validate, join with the features index and split; write ``train.json``, ``val.json``,
    ``rejected.jsonl`` and ``counts.json`` to ``out_dir``. Returns the counts.

    Raises:
        ValueError: unknown ``fmt``, or the annotation file is not a JSON list.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown annotation format {fmt!r}; known: {FORMATS}")
    data = read_json(annotations)
    if not isinstance(data, list):
        raise ValueError(f"{annotations}: expected a JSON list of annotations, got {type(data).__name__}")
    store = FeatureStore(index)
    kept, rejected, seen = [], [], set()
    for position, record, reason in from_videochatgpt_qa(data):
        kind = "invalid entry"
        if record is not None:
            kind, reason = "invalid conversation", check_record(record) or ""
        if not reason and record["video"] not in store:
            kind, reason = "no features", f"video: no features for {record['video']!r} (failed or missing video)"
        if not reason and record["id"] in seen:
            kind, reason = "duplicate id", f"id: {record['id']!r} repeats"
        if reason:
            rejected.append({"file": str(annotations), "index": position, "id": (record or {}).get("id"),
                             "kind": kind, "reason": reason, "entry": data[position]})
            continue
        seen.add(record["id"])
        kept.append(record)
    val_videos = split_by_video([r["video"] for r in kept], val_fraction, seed)
    splits = {"train": [r for r in kept if r["video"] not in val_videos],
              "val": [r for r in kept if r["video"] in val_videos]}
    out_dir = Path(out_dir)
    for name, records in splits.items():
        write_json(out_dir / f"{name}.json", records)
    with atomic_path(out_dir / "rejected.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejected), encoding="utf-8")
    reasons = Counter(r["kind"] for r in rejected)
    counts = {
        "annotations": len(data),
        "kept": len(kept),
        "rejected": len(rejected),
        "rejected_by_reason": dict(reasons.most_common()),
        **{name: {"records": len(records), "videos": len({r["video"] for r in records})}
           for name, records in splits.items()},
    }
    write_json(out_dir / "counts.json", counts)
    log.info("%s: %d kept (%d train, %d val), %d rejected", annotations, len(kept), len(splits["train"]),
             len(splits["val"]), len(rejected))
    return counts


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.data.instructions --annotations A --index I --out-dir D``: the instructions rule."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--format", default="videochatgpt_qa", choices=FORMATS)
    parser.add_argument("--index", required=True, help="the features index")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build(args.annotations, args.format, args.index, args.out_dir, args.val_fraction, args.seed)
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
