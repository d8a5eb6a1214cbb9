"""Stage 5, instructions: one dataset's annotations -> validated LLaVA conversation records, joined with the
features, split into train and val by video.

The converter of the dataset's format (:mod:`pipeline.data.formats`) reads the files as the system publishes them;
every record then passes the same checks: no text holds a control character or a lone surrogate, conversations
alternate human/gpt from a human turn and end with an answer (an unanswered record: with its question), no value is
empty, the ``<video>`` markers match the visuals the record names (:func:`check_record`), no record repeats another
exactly, every visual it names has features (a failed or missing video has none; a text-only record needs none),
and timestamps lie within the video. A record that fails goes to ``rejected.jsonl`` with the file, its index or id,
the field and the reason; ``counts.json`` sums kept records by kind and rejected ones by reason. Good records are
never dropped because of a bad neighbour; only a file that cannot be read at all (not UTF-8, not JSON) fails the
job, with an error naming the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
from collections import Counter
from pathlib import Path

from pipeline import VIDEO_TOKEN
from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.data.formats import FORMATS, Options, text_problem, visuals
from pipeline.io import atomic_path, read_table, write_json

log = logging.getLogger(__name__)


def record_kind(record: dict) -> str:
    """What a record trains or tests on: ``unanswered``, ``text only``, ``images`` (several), ``image`` or
    ``video`` (the keys of ``counts.json``'s ``kept_by_kind``)."""
    if record.get("unanswered"):
        return "unanswered"
    names = visuals(record)
    if not names:
        return "text only"
    if len(names) > 1:
        return "images"
    return "image" if record.get("modality") == "image" else "video"


def _visual_fields(record: dict) -> str | None:
    """Why ``video`` / ``videos`` are malformed, or None."""
    if "video" in record and "videos" in record:
        return "video, videos: a record names one visual (video) or several (videos), not both"
    if "video" in record and not (isinstance(record["video"], str) and record["video"]):
        return "video: expected a non-empty id"
    if "videos" in record:
        names = record["videos"]
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(v, str) and v for v in names)):
            return "videos: expected a list of two or more non-empty ids"
    return None


def check_record(record: dict) -> str | None:
    """Why a converted record is not a valid conversation, or ``None``.

    Checks: ``conversations`` alternate ``human``/``gpt`` starting with ``human`` and ending with ``gpt`` (with
    ``human`` for an ``unanswered`` record: the question without its answer); every value is a non-empty string;
    the ``<video>`` markers match the visual fields: with ``video``, exactly once, in the first human turn; with
    ``videos``, one per visual, in human turns; with neither (text only), none.
    """
    turns = record.get("conversations")
    unanswered = bool(record.get("unanswered"))
    if not isinstance(turns, list) or not turns or len(turns) % 2 != unanswered or len(turns) < 2 - unanswered:
        return "conversations: need human/gpt pairs" + (", then the question" if unanswered else "")
    for i, turn in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected:
            return f"conversations[{i}].from: expected {expected!r}"
        if not isinstance(turn.get("value"), str) or not turn["value"].strip():
            return f"conversations[{i}].value: empty" + (" answer" if expected == "gpt" else "")
    problem = _visual_fields(record)
    if problem:
        return problem
    markers = [turn["value"].count(VIDEO_TOKEN) for turn in turns]
    names = visuals(record)
    if len(names) == 1 and (markers[0] != 1 or sum(markers) != 1):
        return f"conversations: {VIDEO_TOKEN} must appear once, in the first human turn (found {markers})"
    if not names and sum(markers):
        return f"conversations: a text-only record (no video) has {sum(markers)} {VIDEO_TOKEN} marker(s) {markers}"
    if len(names) > 1 and (sum(markers) != len(names) or any(markers[1::2])):
        return (f"conversations: {len(names)} visuals need one {VIDEO_TOKEN} each, in human turns "
                f"(found {markers})")
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


def split_records(records: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, val)``: the records split so that no visual is in both.

    Records that share a visual are one group (a multi-image record joins the groups of all its images), named by
    its smallest id; a group goes whole to one side. Groups holding an unanswered record go to val (they cannot
    train); :func:`split_by_video` draws the val share of the others. Text-only records go to train: they name no
    video to hold out, and evaluation answers questions about videos.
    """
    parent: dict[str, str] = {}

    def group(video: str) -> str:
        while parent.setdefault(video, video) != video:
            video = parent[video]
        return video

    for record in records:
        roots = sorted({group(video) for video in visuals(record)})
        for root in roots[1:]:
            parent[root] = roots[0]  # the smallest id names the group: the same for every order of the records
    held = {group(visuals(r)[0]) for r in records if r.get("unanswered") and visuals(r)}
    drawn = split_by_video([group(v) for r in records for v in visuals(r) if group(v) not in held], val_fraction,
                           seed)
    val_groups = held | drawn
    in_val = [bool(r.get("unanswered")) or bool(visuals(r)) and group(visuals(r)[0]) in val_groups for r in records]
    return ([r for r, val in zip(records, in_val) if not val], [r for r, val in zip(records, in_val) if val])


def _index(path: str | Path) -> dict[str, float | None]:
    """video_id -> duration in seconds (None when unknown) of every video with features."""
    table = read_table(path)
    durations = table["duration"] if "duration" in table else [""] * len(table)
    return {video: float(d) if d not in ("", None) else None for video, d in zip(table["video_id"], durations)}


def _problem(record: dict, videos: dict[str, float | None], seen: set) -> tuple[str, str] | None:
    """``(kind, reason)`` of a converted record that cannot be kept, or None."""
    problem = text_problem(record)
    if problem:
        return "invalid text", problem
    reason = check_record(record)
    if reason:
        return ("empty answer" if "empty answer" in reason else "invalid conversation"), reason
    names = visuals(record)
    for i, video in enumerate(names):
        if video not in videos:
            field = f"videos[{i}]" if "videos" in record else "video"
            return "no features", f"{field}: no features for {video!r} (failed or missing video)"
    duration = videos[names[0]] if len(names) == 1 else None
    stamps = record.get("timestamps", {})
    late = [t for t in stamps.get("src", []) + stamps.get("tgt", []) if duration is not None and t > duration + 0.5]
    if late:
        return "timestamp outside the video", f"timestamps: {late[0]} s beyond the video's {duration} s"
    key = json.dumps([names, record["conversations"]], sort_keys=True)
    if key in seen:
        return "duplicate", f"record repeats an earlier one exactly (visuals {names!r})"
    seen.add(key)
    return None


def _jsonl_line(row: dict) -> bytes:
    """One JSON Lines line of ``row`` in UTF-8; a lone surrogate (text that was not UTF-8) is written as its JSON
    escape (``\\udce9``), so the line always writes and reads back to the same string."""
    return (json.dumps(row, ensure_ascii=False, default=str) + "\n").encode("utf-8", "backslashreplace")


def build(annotations: str | Path, fmt: str, index: str | Path, out_dir: str | Path, val_fraction: float, seed: int,
          options: Options | None = None) -> dict:
    """Convert, check, join with the features index and split (:func:`split_records`); write ``train.json``,
    ``val.json``, ``rejected.jsonl`` (``{"where", "kind", "reason", "entry"}`` per rejected entry) and
    ``counts.json`` to ``out_dir``. Returns the counts: ``annotations``, ``kept``, ``kept_by_kind``
    (:func:`record_kind`), ``rejected``, ``rejected_by_reason``, and ``train`` / ``val`` ``{"records", "videos"}``
    (``videos``: the distinct visuals).

    Raises:
        ValueError: unknown ``fmt``, or an annotation file that cannot be read at all: not UTF-8 (the message names
            the file and the byte offset), not JSON or not a list of entries.
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
    train, val = split_records(kept, val_fraction, seed)
    splits = {"train": train, "val": val}
    out_dir = Path(out_dir)
    for name, records in splits.items():
        write_json(out_dir / f"{name}.json", records)
    with atomic_path(out_dir / "rejected.jsonl") as tmp:
        tmp.write_bytes(b"".join(_jsonl_line(r) for r in rejected))
    counts = {
        "annotations": entries,
        "kept": len(kept),
        "kept_by_kind": dict(Counter(record_kind(r) for r in kept).most_common()),
        "rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["kind"] for r in rejected).most_common()),
        **{name: {"records": len(records), "videos": len({v for r in records for v in visuals(r)})}
           for name, records in splits.items()},
    }
    write_json(out_dir / "counts.json", counts)
    log.info("%s (%s): %d kept %s (%d train, %d val), %d rejected %s", annotations, fmt, len(kept),
             counts["kept_by_kind"], len(train), len(val), len(rejected), counts["rejected_by_reason"])
    return counts


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.data.instructions --annotations A --format F --index I --out-dir D``: the
    instructions rule of one dataset."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--annotations", required=True, help="the annotation file (class_folders: the folder)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--index", required=True, help="the features index")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the videos held out for val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--options", default="{}", help="JSON of pipeline.data.formats.Options fields")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert one dataset (:func:`build`)."""
    args = parser().parse_args(argv)
    options = Options(**{**json.loads(args.options), "seed": args.seed})
    build(args.annotations, args.format, args.index, args.out_dir, args.val_fraction, args.seed, options)
    return 0


if __name__ == "__main__":
    run(main)
