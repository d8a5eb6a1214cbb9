"""Evaluate a trained stage on a benchmark: answer its questions, then score the answers as the benchmark does.

    python -m pipeline.eval.run answer --model results/train/stage2/model --index results/features/index.tsv \\
        --benchmark mvbench --annotations MVBench/json --root MVBench/video --out predictions.jsonl \\
        [--status results/features/shard-*.tsv] [--generation '{"max_new_tokens": 16}']
    python -m pipeline.eval.run score --benchmark mvbench --annotations MVBench/json --predictions predictions.jsonl \\
        --out metrics.json [--variant lmms_eval] [--judge JUDGE.json --judge-cache judgments.jsonl]

A benchmark's videos are videos of the pipeline: the manifest lists them and they go through the same download,
transcode, compress and features stages as training videos. An item's video (as the annotation names it, relative
to ``--root``) is the manifest's ``video_id`` of :func:`pipeline.data.formats.video_reference`. An item whose video
failed upstream (the data stages' ``--status`` tables give the reason), is not in the stage's visuals, or does not
load is not answered: it is a row of ``predictions.jsonl`` with ``prediction`` null and its ``status``, and scores as
wrong (``unanswered``); nothing else is dropped.

Answering sorts the questions by video, so that a video's features are read once for all its questions
(:class:`pipeline.eval.generate.StageAnswerer`), and places ``<video>`` before or after the question as the
generation settings say. Video-ChatGPT's consistency benchmark asks each item's two phrasings (``prediction``,
``prediction_2``). Scoring is split from answering so that another judge or scorer variant re-scores the same
answers without generating again.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.data.formats import VIDEO_TOKEN, EntryError, video_reference
from pipeline.eval.benchmarks import get
from pipeline.eval.benchmarks.base import Benchmark, InputError
from pipeline.eval.generate import GenerationSettings, write_jsonl
from pipeline.io import read_table, write_json

log = logging.getLogger(__name__)

# The fields of an item that a prediction row carries for the report and for reading the answers later.
_ROW_FIELDS = ("video", "prompt", "answer", "task", "duration")


def question_text(prompt: str, placement: str) -> str:
    """A human turn of ``prompt`` with the ``<video>`` marker ``before`` (lmms-eval's tasks: the visual first) or
    ``after`` the question (Video-ChatGPT's inference scripts, ``run_inference_*.py``)."""
    return f"{VIDEO_TOKEN}\n{prompt}" if placement == "before" else f"{prompt}\n{VIDEO_TOKEN}"


def failed_videos(status_tables: list[str | Path]) -> dict[str, str]:
    """``{video_id: "<stage>: <reason>"}`` of the videos some data stage failed (its status table's rows whose
    ``status`` is not ``ok``; the stage is the table's folder name)."""
    failed: dict[str, str] = {}
    for path in status_tables:
        table = read_table(path)
        for row in table[table["status"] != "ok"].itertuples():
            failed.setdefault(str(row.video_id), f"{Path(path).parent.name}: {row.reason}")
    return failed


def answer_benchmark(benchmark: Benchmark, items: list[dict], answerer, settings: GenerationSettings,
                     root: str | None = None, failed: dict[str, str] | None = None) -> list[dict]:
    """Answer every item that can be answered; one row per item, in the items' order.

    Args:
        benchmark: the benchmark (its format decides whether each item asks one question or two).
        items: from ``benchmark.load``.
        answerer: a :class:`pipeline.eval.generate.StageAnswerer` (or anything with ``answer(records, settings)``
            and ``__contains__(video_id)``).
        root: the folder the items' video names are relative to.
        failed: ``{video_id: reason}`` of the videos the data stages failed (:func:`failed_videos`).

    Returns:
        Rows ``{"id", "video_id", "status", "prediction" (str | None), ["prediction_2"], video, prompt, answer, task,
        duration}``; ``status`` is ``ok`` or why the item was not answered (a bad video path, the video failed
        upstream or is not in the stage's visuals, its visuals did not load).
    """
    from pipeline.shards import ItemError

    failed = failed or {}
    two = benchmark.format == "vcgpt_consistency"
    rows, pending = [], []
    for item in items:
        row = {"id": item["id"], "video_id": None, "status": "ok", "prediction": None,
               **({"prediction_2": None} if two else {}), **{key: item.get(key) for key in _ROW_FIELDS}}
        rows.append(row)
        try:
            # MVBench names a video inside its subtask's folder (item["video_folder"])
            row["video_id"] = video_reference(f"{item.get('video_folder') or ''}{item['video']}", root)
        except EntryError as e:
            row["status"] = f"bad video path: {e}"
            continue
        if row["video_id"] in failed:
            row["status"] = f"failed upstream: {failed[row['video_id']]}"
        elif row["video_id"] not in answerer:
            row["status"] = "not in the stage's visuals (not in the manifest, or failed upstream)"
        else:
            pending += [(row, "prediction", item["prompt"])] + ([(row, "prediction_2", item["prompt_2"])] if two
                                                                 else [])
    pending.sort(key=lambda p: p[0]["video_id"])  # a video's questions together: its visuals are read once
    size = settings.batch_size
    for first in range(0, len(pending), size):
        chunk = pending[first:first + size]
        records = [{"id": row["id"], "video": row["video_id"],
                    "conversations": [{"from": "human", "value": question_text(prompt, settings.video_placement)}]}
                   for row, _, prompt in chunk]
        try:
            answers = answerer.answer(records, settings)
        except ItemError:  # find which video: answer one at a time
            answers = []
            for (row, _, _), record in zip(chunk, records):
                try:
                    answers += answerer.answer([record], settings)
                except ItemError as e:
                    row["status"] = f"visuals did not load: {e}"
                    answers.append(None)
        for (row, field, _), text in zip(chunk, answers):
            if row["status"] == "ok":
                row[field] = text
        log.info("answered %d/%d questions", min(first + size, len(pending)), len(pending))
    for row in rows:  # a consistency item is answered only with both phrasings
        if row["status"] != "ok":
            row.update(prediction=None, **({"prediction_2": None} if two else {}))
    return rows


def predictions_of(rows: list[dict], benchmark: Benchmark) -> dict[str, Any]:
    """The scorer's predictions of answer rows: ``{id: text}`` (consistency: ``{id: {"prediction",
    "prediction_2"}}``), only the answered rows."""
    if benchmark.format == "vcgpt_consistency":
        return {r["id"]: {"prediction": r["prediction"], "prediction_2": r["prediction_2"]} for r in rows
                if r["prediction"] is not None}
    return {r["id"]: r["prediction"] for r in rows if r["prediction"] is not None}


def read_rows(path: str | Path) -> list[dict]:
    """The answer rows of a ``predictions.jsonl`` that :func:`answer_benchmark` wrote.

    Raises:
        InputError: a line that is not JSON or a row without ``id``, ``status`` or ``prediction``.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise InputError(path, f"line {number}: not JSON: {e}") from None
        missing = [key for key in ("id", "status", "prediction") if not isinstance(row, dict) or key not in row]
        if missing:
            raise InputError(path, f"line {number}: no {missing[0]!r}")
        rows.append(row)
    return rows


def score_rows(benchmark: Benchmark, items: list[dict], skipped: list[dict], rows: list[dict], **options: Any) -> dict:
    """The benchmark's metrics of answer rows (:func:`pipeline.eval.score.score_benchmark`, ``options`` are its
    variant / judge / judge_cache), with ``not_answered`` (``{status: n}``), ``failed_videos`` (``[{"video",
    "video_id", "reason"}]``, one per video) and the annotations' ``skipped`` records added."""
    from pipeline.eval.score import score_benchmark

    metrics = score_benchmark(benchmark, items, predictions_of(rows, benchmark), **options)
    not_answered: dict[str, int] = {}
    videos: dict[str, dict] = {}
    for row in rows:
        if row["status"] != "ok":
            not_answered[row["status"]] = not_answered.get(row["status"], 0) + 1
            videos.setdefault(str(row.get("video")), {"video": row.get("video"), "video_id": row.get("video_id"),
                                                      "reason": row["status"]})
    return {**metrics, "not_answered": not_answered, "failed_videos": list(videos.values()), "skipped": skipped}


def _json_option(text: str | None, option: str) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise SystemExit(f"error: {option}: not JSON: {e}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"error: {option}: expected a JSON object")
    return value


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.eval.run {answer,score} ...``."""
    parser = cli_parser(__spec__.name, __doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    answer = commands.add_parser("answer", help="answer a benchmark's questions with a trained stage")
    score = commands.add_parser("score", help="score the answers as the benchmark does")
    for sub in (answer, score):
        sub.add_argument("--benchmark", required=True, help="the benchmark's format (pipeline.eval.benchmarks)")
        sub.add_argument("--annotations", required=True, help="its annotations, in its published layout")
        sub.add_argument("--out", required=True, help="predictions.jsonl (answer) or metrics.json (score)")
    answer.add_argument("--model", required=True, help="a stage's model folder")
    answer.add_argument("--index", help="the features index (stages with cached vision)")
    answer.add_argument("--videos", help="the compressed videos' index (stages with online vision)")
    answer.add_argument("--root", help="the folder the annotations' video names are relative to")
    answer.add_argument("--status", nargs="*", default=[], help="the data stages' status tables (failure reasons)")
    answer.add_argument("--generation", help="GenerationSettings as JSON (default: greedy, 32 new tokens)")
    score.add_argument("--predictions", required=True, help="the predictions.jsonl that `answer` wrote")
    score.add_argument("--variant", help="mcq / grounding: videochat_flash (default) or lmms_eval")
    score.add_argument("--judge", help="open_qa / vcgpt_*: the judge config as JSON")
    score.add_argument("--judge-cache", help="the judgments' JSON-lines cache (kept across reruns)")
    score.add_argument("--stage", help="the evaluated stage's name (recorded in the metrics)")
    score.add_argument("--name", help="the benchmark's name in the config (recorded as the metrics' benchmark)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Answer or score (exit status 2: a bad annotation or prediction file, named on stderr)."""
    args = parser().parse_args(argv)
    benchmark = get(args.benchmark)
    try:
        items, skipped = benchmark.load(args.annotations)
        if args.command == "answer":
            from pipeline.eval.generate import StageAnswerer

            settings = GenerationSettings(**_json_option(args.generation, "--generation"))
            answerer = StageAnswerer(args.model, args.index, args.videos)
            rows = answer_benchmark(benchmark, items, answerer, settings, args.root, failed_videos(args.status))
            write_jsonl(args.out, rows)
            log.info("%s: %d of %d items answered; %d annotation records skipped", args.benchmark,
                     sum(r["status"] == "ok" for r in rows), len(rows), len(skipped))
            return 0
        rows = read_rows(args.predictions)
    except InputError as e:
        log.error("%s", e)
        return 2
    judge = _json_option(args.judge, "--judge") or None
    metrics = score_rows(benchmark, items, skipped, rows, variant=args.variant, judge=judge,
                         judge_cache=args.judge_cache)
    metrics.update({key: value for key, value in (("stage", args.stage), ("benchmark", args.name)) if value})
    write_json(args.out, metrics)
    log.info("%s: %s %s over %d items", args.benchmark, metrics["headline"]["overall"],
             metrics["headline"]["units"], len(items))
    return 0


if __name__ == "__main__":
    run(main)
