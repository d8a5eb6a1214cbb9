"""Zero-shot open-ended video QA judged by an LLM, as Video-ChatGPT scores it: MSVD-QA, MSRVTT-QA, TGIF-QA,
ActivityNet-QA, and ``open_qa`` (any set in our own layout).

Sources. ``VCGPT`` is github.com/mbzuai-oryx/Video-ChatGPT at commit 659e04b2; ``VCGPT X:N`` is line N of file X.
The judge's prompt is ``quantitative_evaluation/evaluate_activitynet_qa.py:36-58``
(:data:`pipeline.eval.judge.TEMPLATES` ``["qa"]``); its README (quantitative_evaluation/README.md,
"Zero-Shot Question-Answer Evaluation") says the protocol "remains the same for all datasets", so all five
benchmarks here share it.

Annotation layouts read by :func:`load` (one path: a file, or a folder holding ``test_q.json`` + ``test_a.json``):

- paired question/answer files, as ActivityNet-QA ships them and Video-ChatGPT's inference reads them
  (VCGPT video_chatgpt/eval/run_inference_activitynet_qa.py:38-58): ``test_q.json`` a list of
  ``{"question_id", "question", "video_name"}``, ``test_a.json`` a list of ``{"question_id", "answer", "type"?}``.
  Given ``X_q.json``, its answers are ``X_a.json`` beside it. Records are joined by ``question_id`` (upstream joins
  by position, :53-58; when the answer records have no ``question_id`` they are joined by position here too).
  The zero-shot MSVD/MSRVTT/TGIF sets that Video-ChatGPT distributes use the same pair.
- one list of records (a ``.json`` list, or ``.jsonl`` one record a line), as MSVD-QA / MSRVTT-QA ship them
  (``{"question", "answer", "video_id", "id"}``) and as our own ``open_qa`` layout ``{"id", "video", "question",
  "answer", "task"?}``. Field aliases: id ``id`` | ``question_id``; video ``video`` | ``video_name`` | ``video_id``;
  task ``task`` | ``type``.

An item's ``task`` is the record's question type (``type``) where the set has one, e.g. ActivityNet-QA's ``type``
0-8, and gives the ``tasks`` breakdown; ``video`` is the name as the annotation gives it (upstream tries the
extensions .mp4/.avi/.mov/.mkv, run_inference_activitynet_qa.py:50, :64-68).

Scoring (:func:`score`), upstream at evaluate_activitynet_qa.py:170-194: each answered item is judged once; its
``score`` is the judge's integer 0-5 and it is correct when the judge's ``pred`` contains "yes". Upstream divides
the yes count by yes + no judged pairs (:190) and the score sum by the judged pairs (:189) and, since it re-asks
until every reply parses, judges every pair it has. Here every item counts: an item without a prediction is "no"
with score 0 (``unanswered``), and so is a malformed or failed judgment (``malformed``, by reason); ``accuracy`` is
the yes count over all items in percent (upstream's fraction, as its README table reports it, x100), ``score`` the
mean over all items. ``accuracy_judged`` / ``score_judged`` are upstream's denominators (valid judgments only).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks.base import Benchmark, InputError, skipped
from pipeline.eval.judge import (
    TEMPLATES,
    Judge,
    JudgeCache,
    JudgeRequest,
    Judgment,
    count_malformed,
    judge_from_config,
    judge_items,
    judge_key,
)

FORMAT = "open_qa"
_ID = ("id", "question_id")
_VIDEO = ("video", "video_name", "video_id")
_TASK = ("task", "type")


# ---------------------------------------------------------------------------------------------------------------
# Reading


def read_json_or_lines(path: str | Path) -> Any:
    """A ``.jsonl`` file as a list of its records (blank lines skipped), any other file as JSON.

    Raises:
        InputError: the file is missing or not valid JSON (the message names the line for JSON lines).
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        return _lines(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read: {e}") from None
    try:
        return json.loads(text)
    except ValueError as e:
        raise InputError(path, f"not JSON: {e}") from None


def _first(record: dict, names: tuple[str, ...]) -> Any:
    for name in names:
        if record.get(name) is not None:
            return record[name]
    return None


def _text(value: Any) -> str | None:
    """A string, or a number as its string (MSVD-QA's integer video ids), else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def _pair_paths(path: Path) -> tuple[Path, Path] | None:
    if path.is_dir():
        q, a = path / "test_q.json", path / "test_a.json"
        if not q.exists() or not a.exists():
            raise InputError(path, "a folder must hold test_q.json and test_a.json")
        return q, a
    if path.name.endswith("_q.json"):
        a = path.with_name(path.name[: -len("_q.json")] + "_a.json")
        if a.exists():
            return path, a
    return None


def _records(data: Any, path: Path) -> list[dict]:
    if not isinstance(data, list):
        raise InputError(path, f"expected a list of records, got {type(data).__name__}")
    return data


def _merge_pairs(q_path: Path, a_path: Path, bad: list[dict]) -> list[tuple[Any, dict]]:
    """``(record label, merged record)`` of paired question/answer files."""
    questions = _records(read_json_or_lines(q_path), q_path)
    answers = _records(read_json_or_lines(a_path), a_path)
    by_id = {}
    keyed = all(isinstance(a, dict) and a.get("question_id") is not None for a in answers)
    if keyed:
        for answer in answers:
            by_id.setdefault(str(answer["question_id"]), answer)
    elif len(answers) != len(questions):
        raise InputError(a_path, f"{len(answers)} answers without question_id for {len(questions)} questions")
    merged = []
    for index, question in enumerate(questions):
        if not isinstance(question, dict):
            bad.append(skipped(q_path, index, "", "record is not an object"))
            continue
        qid = question.get("question_id")
        if keyed:
            answer = by_id.get(str(qid)) if qid is not None else None
            if answer is None:
                bad.append(skipped(a_path, qid if qid is not None else index, "question_id", "no answer record"))
                continue
        else:
            answer = answers[index] if isinstance(answers[index], dict) else {}
        merged.append((qid if qid is not None else index, {**answer, **question}))
    return merged


def load(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Read an open-ended QA set (the layouts in the module's docstring) into items.

    Items: ``id``, ``video``, ``prompt`` (the question, sent as is: run_inference_activitynet_qa.py:76),
    ``question``, ``answer``, ``task`` (the question type or None), ``duration`` (None).

    Returns:
        ``(items, skipped records)``; a record without a question, an answer, a video or an id, or with an id seen
        before, is skipped (``{"file", "record", "field", "reason"}``).

    Raises:
        InputError: a file that is missing, not JSON or not a list.
    """
    path = Path(path)
    bad: list[dict] = []
    pair = _pair_paths(path)
    if pair:
        source, labelled = pair[0], _merge_pairs(*pair, bad)
    else:
        source = path
        labelled = list(enumerate(_records(read_json_or_lines(path), path)))
    items, seen = [], set()
    for label, record in labelled:
        if not isinstance(record, dict):
            bad.append(skipped(source, label, "", "record is not an object"))
            continue
        values = {"id": _text(_first(record, _ID)), "video": _text(_first(record, _VIDEO)),
                  "question": _text(record.get("question")), "answer": _text(record.get("answer"))}
        missing = [name for name, value in values.items() if value is None or value == ""]
        if missing:
            bad.append(skipped(source, label, missing[0], "missing or not a string"))
            continue
        if values["id"] in seen:
            bad.append(skipped(source, label, "id", f"duplicate id {values['id']}"))
            continue
        seen.add(values["id"])
        task = _first(record, _TASK)
        items.append({**values, "prompt": values["question"], "task": None if task is None else str(task),
                      "duration": None})
    return items, bad


def read_predictions(path: str | Path) -> dict[str, str]:
    """Predictions as JSON lines ``{"id": str, "prediction": str}`` (a ``.json`` list of such records also works).

    Returns:
        ``{id: text}``.

    Raises:
        InputError: the file cannot be read, a record is not an object with a string/number ``id`` and a string
            ``prediction``, or an id appears twice.
    """
    return {key: value["prediction"] for key, value in read_prediction_records(path, ("prediction",)).items()}


def read_prediction_records(path: str | Path, fields: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``{id: {field: text}}`` of a prediction file whose records carry ``id`` and the string ``fields``.

    Raises:
        InputError: as :func:`read_predictions`.
    """
    path = Path(path)
    try:
        data = read_json_or_lines(path) if path.suffix == ".json" else _lines(path)
    except InputError:
        data = _lines(path)  # a .json file holding JSON lines
    if not isinstance(data, list):
        raise InputError(path, "expected JSON lines of {\"id\", \"prediction\"} records")
    out: dict[str, dict[str, str]] = {}
    for number, record in enumerate(data, 1):
        key = _text(record.get("id")) if isinstance(record, dict) else None
        if key is None:
            raise InputError(path, f"record {number}: no string id")
        values = {name: record.get(name) for name in fields}
        for name, value in values.items():
            if not isinstance(value, str):
                raise InputError(path, f"record {number} (id {key}): {name} is not a string")
        if key in out:
            raise InputError(path, f"record {number}: duplicate id {key}")
        out[key] = values
    return out


def _lines(path: Path) -> list:
    """JSON lines of a file whatever its extension."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read: {e}") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise InputError(path, f"line {number}: not JSON: {e}") from None
    return records


# ---------------------------------------------------------------------------------------------------------------
# Scoring


def resolve_judge(judge: Judge | dict | None, cache: JudgeCache | str | Path | None) -> tuple[Judge, JudgeCache]:
    """The judge (built by :func:`pipeline.eval.judge.judge_from_config` when a dict) and the cache (opened when a
    path; in memory when None).

    Raises:
        ValueError: no judge, or a bad judge config.
    """
    if judge is None:
        raise ValueError("this benchmark is judged by an LLM: pass judge= (a Judge or a judge config dict)")
    if isinstance(judge, dict):
        judge = judge_from_config(judge)
    if not isinstance(cache, JudgeCache):
        cache = JudgeCache(cache)
    return judge, cache


def answered(prediction: Any) -> bool:
    """Whether a prediction is an answer: a string with some non-space text."""
    return isinstance(prediction, str) and bool(prediction.strip())


def _summary(rows: list[tuple[Judgment | None]]) -> dict[str, Any]:
    count = len(rows)
    valid = [j for j in rows if j is not None and j.ok]
    yes = sum(j.pred == "yes" for j in valid)
    total = sum(j.score for j in valid)
    return {
        "accuracy": 100.0 * yes / count if count else None,
        "score": total / count if count else None,
        "count": count,
        "yes": yes,
        "no": count - yes,
        "judged": len(valid),
        "accuracy_judged": 100.0 * yes / len(valid) if valid else None,
        "score_judged": total / len(valid) if valid else None,
    }


def score(items: list[dict], predictions: dict[str, str], judge: Judge | dict | None = None,
          cache: JudgeCache | str | Path | None = None, per_item: bool = False) -> dict[str, Any]:
    """Judge and score open-ended answers as VCGPT quantitative_evaluation/evaluate_activitynet_qa.py:170-194 does
    (see the module's docstring for where we differ).

    Args:
        items: from :func:`load`.
        predictions: ``{id: text}``; a missing, non-string or blank text is unanswered ("no", score 0).
        judge: a :class:`pipeline.eval.judge.Judge` or a judge config dict (``{"kind": "hf", "model": PATH}`` /
            ``{"kind": "openai", "base_url": URL, "model": NAME, "api_key_env": VAR}``).
        cache: a :class:`JudgeCache`, the path of its JSON-lines file, or None (in memory, nothing reused later).
        per_item: also return ``items``: ``[{"id", "pred", "score", "malformed"}]``.

    Returns:
        ``{"overall": {accuracy (percent), score (0-5), count, yes, no, judged, accuracy_judged, score_judged},
        "tasks": {task: same} (only when items have a task), "count", "unanswered", "malformed": {reason: n},
        "request_errors": {error: n}, "judge": the judge's key, "template": the prompt's id}``; ``accuracy`` and
        ``score`` are None for no items.

    Raises:
        ValueError: no judge.
        OSError: the cache cannot be written.
    """
    judge, cache = resolve_judge(judge, cache)
    template = TEMPLATES["qa"]
    requests = [JudgeRequest(item["id"], template, {"question": item["question"], "answer": item["answer"],
                                                    "pred": predictions[item["id"]]})
                for item in items if answered(predictions.get(item["id"]))]
    judged = {j.id: j for j in judge_items(judge, cache, requests)}
    rows = [judged.get(item["id"]) for item in items]
    result: dict[str, Any] = {"overall": _summary(rows)}
    tasks = sorted({item["task"] for item in items if item.get("task") is not None})
    if tasks:
        result["tasks"] = {task: _summary([row for item, row in zip(items, rows) if item.get("task") == task])
                           for task in tasks}
    result.update({
        "count": len(items),
        "unanswered": sum(row is None for row in rows),
        "malformed": count_malformed(judged.values()),
        "request_errors": dict(Counter(j.error for j in judged.values() if j.error)),
        "judge": judge_key(judge),
        "template": template.id,
    })
    if per_item:
        result["items"] = [{"id": item["id"], "pred": row.pred if row else None, "score": row.score if row else None,
                            "malformed": row.malformed if row else None} for item, row in zip(items, rows)]
    return result


def _benchmark(name: str) -> Benchmark:
    return Benchmark(name=name, format=FORMAT, load=load, score=score, read_predictions=read_predictions,
                     options=("judge", "cache", "per_item"))


BENCHMARKS: dict[str, Benchmark] = {name: _benchmark(name)
                                    for name in ("msvd_qa", "msrvtt_qa", "tgif_qa", "activitynet_qa", "open_qa")}
