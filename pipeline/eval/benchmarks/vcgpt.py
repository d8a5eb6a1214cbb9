"""Video-ChatGPT's video-based generative performance benchmark: five criteria judged by an LLM on a 0-5 scale.

Sources. ``VCGPT`` is github.com/mbzuai-oryx/Video-ChatGPT at commit 659e04b2; ``VCGPT X:N`` is line N of file X.
The criteria and their prompts (:data:`pipeline.eval.judge.TEMPLATES`) are
``quantitative_evaluation/evaluate_benchmark_1_correctness.py`` (correctness of information),
``_2_detailed_orientation.py`` (detail orientation), ``_3_context.py`` (contextual understanding), ``_4_temporal.py``
(temporal understanding) and ``_5_consistency.py`` (consistency); quantitative_evaluation/README.md says the
question-answer file of correctness, detail and context is one and the same (``generic_qa.json``), temporal and
consistency have their own (``temporal_qa.json``, ``consistency_qa.json``).

Benchmarks (format = name):

- ``vcgpt_generic``: criteria ``correctness``, ``detail``, ``context``; ``generic_qa.json``.
- ``vcgpt_temporal``: criterion ``temporal``; ``temporal_qa.json``.
- ``vcgpt_consistency``: criterion ``consistency``; ``consistency_qa.json``. Each item asks two phrasings of one
  question (``prompt`` = ``Q1``, ``prompt_2`` = ``Q2``) and the judge sees both answers
  (evaluate_benchmark_5_consistency.py:53-59). **Prediction layout**: JSON lines
  ``{"id": str, "prediction": answer to prompt, "prediction_2": answer to prompt_2}``; its ``read_predictions``
  returns ``{id: {"prediction": str, "prediction_2": str}}`` (a dict, not a text, for this format only). An item
  with either answer missing or blank is unanswered.

Annotation layout (:func:`load`): a JSON list of ``{"Q", "A", "video_name"}`` (consistency: ``{"Q1", "Q2", "A",
"video_name"}``), as the inference scripts read it (VCGPT video_chatgpt/eval/run_inference_benchmark_general.py:50-54,
run_inference_benchmark_consistency.py:50-54); the generation scripts' combined dict ``{video_name: {"Q", "A"}}``
(benchmark_dataset_generation/generate_correctness_detailed_context_qa.py:127-136) is read too. An item's ``id`` is
``<video_name>_<k>``, ``k`` counting that video's earlier records from 0, the key upstream's evaluation gives each pair
(evaluate_benchmark_1_correctness.py:89-100).

Scoring (:func:`score`), upstream at evaluate_benchmark_1_correctness.py:171-181 (the same in the four others):
per criterion the mean of ``int(score)``. Upstream averages over the pairs it judged (it re-asks until each reply
parses; a pair whose inference failed is absent, run_inference_benchmark_general.py:73-74). Here ``score`` is over
all items, an unanswered item or a malformed/failed judgment scoring 0 (counted under ``unanswered`` / ``malformed``);
``score_judged`` is upstream's denominator (valid judgments only).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks.base import Benchmark, InputError, skipped
from pipeline.eval.benchmarks.open_qa import answered, read_json_or_lines, read_prediction_records, resolve_judge
from pipeline.eval.benchmarks.open_qa import read_predictions as read_predictions  # noqa: F401 (re-exported)
from pipeline.eval.judge import TEMPLATES, Judge, JudgeCache, JudgeRequest, count_malformed, judge_items, judge_key

CRITERIA = {
    "vcgpt_generic": ("correctness", "detail", "context"),
    "vcgpt_temporal": ("temporal",),
    "vcgpt_consistency": ("consistency",),
}


def _load(path: str | Path, consistency: bool) -> tuple[list[dict], list[dict]]:
    path = Path(path)
    data = read_json_or_lines(path)
    if isinstance(data, dict):
        data = [{**record, "video_name": name} if isinstance(record, dict) else record
                for name, record in data.items()]
    if not isinstance(data, list):
        raise InputError(path, f"expected a list of records, got {type(data).__name__}")
    fields = ("Q1", "Q2", "A", "video_name") if consistency else ("Q", "A", "video_name")
    items, bad, seen = [], [], Counter()
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            bad.append(skipped(path, index, "", "record is not an object"))
            continue
        missing = [name for name in fields if not isinstance(record.get(name), str) or not record[name].strip()]
        if missing:
            bad.append(skipped(path, index, missing[0], "missing, blank or not a string"))
            continue
        video = record["video_name"]
        item_id = f"{video}_{seen[video]}"
        seen[video] += 1
        question = record["Q1"] if consistency else record["Q"]
        item = {"id": item_id, "video": video, "prompt": question, "question": question, "answer": record["A"],
                "task": None, "duration": None}
        if consistency:
            item.update({"prompt_2": record["Q2"], "question_2": record["Q2"]})
        items.append(item)
    return items, bad


def load(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Read ``generic_qa.json`` or ``temporal_qa.json`` (``{"Q", "A", "video_name"}`` records) into items
    (``id`` ``<video_name>_<k>``, ``video``, ``prompt`` = ``question`` = Q, ``answer`` = A).

    Returns:
        ``(items, skipped records)``: a record lacking a non-blank string Q, A or video_name is skipped.

    Raises:
        InputError: the file is missing, not JSON, or neither a list nor a dict of records.
    """
    return _load(path, consistency=False)


def load_consistency(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Read ``consistency_qa.json`` (``{"Q1", "Q2", "A", "video_name"}`` records) into items: as :func:`load`, with
    ``prompt`` = ``question`` = Q1 and ``prompt_2`` = ``question_2`` = Q2.

    Raises:
        InputError: as :func:`load`.
    """
    return _load(path, consistency=True)


def read_consistency_predictions(path: str | Path) -> dict[str, dict[str, str]]:
    """JSON lines ``{"id", "prediction", "prediction_2"}`` as ``{id: {"prediction", "prediction_2"}}``.

    Raises:
        InputError: a record without a string id, prediction or prediction_2, or a duplicate id.
    """
    return read_prediction_records(path, ("prediction", "prediction_2"))


def _criterion_summary(scores: list[int | None]) -> dict[str, Any]:
    valid = [s for s in scores if s is not None]
    return {"score": sum(valid) / len(scores) if scores else None, "count": len(scores), "judged": len(valid),
            "score_judged": sum(valid) / len(valid) if valid else None}


def score(items: list[dict], predictions: dict[str, Any], judge: Judge | dict | None = None,
          cache: JudgeCache | str | Path | None = None, criteria: tuple[str, ...] | None = None,
          per_item: bool = False) -> dict[str, Any]:
    """Judge every item once per criterion and average the 0-5 scores (VCGPT
    quantitative_evaluation/evaluate_benchmark_1_correctness.py:171-181 and its four siblings).

    Args:
        items: from :func:`load` / :func:`load_consistency` (consistency when items carry ``prompt_2``).
        predictions: ``{id: text}``; for consistency ``{id: {"prediction", "prediction_2"}}``. Missing or blank is
            unanswered (score 0 in every criterion).
        judge: a :class:`pipeline.eval.judge.Judge` or a judge config dict.
        cache: a :class:`JudgeCache`, its file's path, or None (in memory).
        criteria: which of correctness/detail/context/temporal/consistency; default ``("consistency",)`` for
            consistency items, else ``("correctness", "detail", "context")``.
        per_item: also return ``items``: ``[{"id", criterion: score or None, ...}]``.

    Returns:
        ``{"overall": {criterion: mean score 0-5 over all items}, "criteria": {criterion: {score, count, judged,
        score_judged}}, "count", "unanswered", "malformed": {criterion: {reason: n}}, "request_errors": {error: n},
        "judge": the judge's key, "templates": {criterion: prompt id}}``.

    Raises:
        ValueError: no judge, an unknown criterion, or consistency mixed with other criteria or asked of items
            without ``prompt_2``.
        OSError: the cache cannot be written.
    """
    judge, cache = resolve_judge(judge, cache)
    consistency = bool(items) and all("prompt_2" in item for item in items)
    criteria = tuple(criteria or (CRITERIA["vcgpt_consistency"] if consistency else CRITERIA["vcgpt_generic"]))
    for criterion in criteria:
        if criterion not in TEMPLATES or criterion == "qa":
            raise ValueError(f"unknown criterion {criterion!r}")
    two = "consistency" in criteria
    if two and (len(criteria) > 1 or (items and not consistency)):
        raise ValueError("the consistency criterion is scored alone, on items with prompt_2 (consistency_qa.json)")
    fields: dict[str, dict[str, str]] = {}
    for item in items:
        prediction = predictions.get(item["id"])
        if two:
            if isinstance(prediction, dict) and answered(prediction.get("prediction")) \
                    and answered(prediction.get("prediction_2")):
                fields[item["id"]] = {"question": item["question"], "question_2": item["question_2"],
                                      "answer": item["answer"], "pred": prediction["prediction"],
                                      "pred_2": prediction["prediction_2"]}
            continue
        if isinstance(prediction, dict):
            prediction = prediction.get("prediction")
        if answered(prediction):
            fields[item["id"]] = {"question": item["question"], "answer": item["answer"], "pred": prediction}
    scores: dict[str, dict[str, int | None]] = {}
    malformed: dict[str, dict[str, int]] = {}
    errors: Counter = Counter()
    for criterion in criteria:
        template = TEMPLATES[criterion]
        requests = [JudgeRequest(item["id"], template, fields[item["id"]]) for item in items if item["id"] in fields]
        judged = judge_items(judge, cache, requests)
        scores[criterion] = {j.id: j.score if j.ok else None for j in judged}
        malformed[criterion] = count_malformed(judged)
        errors.update(j.error for j in judged if j.error)
    per_criterion = {criterion: _criterion_summary([scores[criterion].get(item["id"]) for item in items])
                     for criterion in criteria}
    result: dict[str, Any] = {
        "overall": {criterion: summary["score"] for criterion, summary in per_criterion.items()},
        "criteria": per_criterion,
        "count": len(items),
        "unanswered": sum(item["id"] not in fields for item in items),
        "malformed": malformed,
        "request_errors": dict(errors),
        "judge": judge_key(judge),
        "templates": {criterion: TEMPLATES[criterion].id for criterion in criteria},
    }
    if per_item:
        result["items"] = [{"id": item["id"], **{c: scores[c].get(item["id"]) for c in criteria}} for item in items]
    return result


def _score_for(name: str):
    def scorer(items: list[dict], predictions: dict[str, Any], **options: Any) -> dict[str, Any]:
        options.setdefault("criteria", CRITERIA[name])
        return score(items, predictions, **options)

    scorer.__doc__ = f"{name}: :func:`score` with criteria {', '.join(CRITERIA[name])}."
    return scorer


BENCHMARKS: dict[str, Benchmark] = {
    "vcgpt_generic": Benchmark("vcgpt_generic", "vcgpt_generic", load, _score_for("vcgpt_generic"),
                               read_predictions, ("judge", "cache", "criteria", "per_item")),
    "vcgpt_temporal": Benchmark("vcgpt_temporal", "vcgpt_temporal", load, _score_for("vcgpt_temporal"),
                                read_predictions, ("judge", "cache", "per_item")),
    "vcgpt_consistency": Benchmark("vcgpt_consistency", "vcgpt_consistency", load_consistency,
                                   _score_for("vcgpt_consistency"), read_consistency_predictions,
                                   ("judge", "cache", "per_item")),
}
