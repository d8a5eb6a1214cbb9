"""Temporal grounding (Charades-STA) scored as lmms-eval and VideoChat-Flash score it.

Sources. ``VCF <path>:N`` is line N of OpenGVLab/VideoChat-Flash ``lmms-eval_videochat/lmms_eval/tasks/<path>``
(commit 2f8e2f57), the ``videochat_flash`` variant; ``LE <path>:N`` is line N of EvolvingLMMs-Lab/lmms-eval
``lmms_eval/tasks/<path>`` (commit 75571cfe), the ``lmms_eval`` variant.

Layout. The annotation is a JSON list of ``{video, caption, timestamp: [s, e]}`` (VCF
eval_annotations/Temporal_Grounding/json/temporal_grounding_charades.json; lmms-eval/charades_sta has the same
columns). The submission lmms-eval writes is one dict ``{"<video>>>><caption>>>><timestamp>": text}``, the key an
f-string of the record (VCF temporal_grounding/utils.py:47-49, LE charades_sta/utils.py:75-79), so the timestamp
reads as Python prints the list (``[24.3, 30.4]``); that key is the item id. Records with the same key collapse into
one upstream; here the later ones are reported as duplicates.

Prompt: ``f"{pre_prompt}{caption}. {post_prompt}"`` with the pre/post prompts of VCF temporal_grounding/charades.yaml
(typo ``seonds`` kept), greedy, 50 new tokens (VCF temporal_grounding/_default_template.yaml:6-11).

Parsing (``extract_time``): both lower-case the answer, drop the example sentence, replace every ``"to"`` with ``"-"``
(so ``"tomato"`` reads ``"-ma-"``), split sentences at ``!?\\n`` and keep those with a keyword (start, end, happen...).

- ``videochat_flash`` (VCF temporal_grounding/eval_tvg.py:24-95): every ``A - B`` (``\\d+\\.*\\d*``, ASCII hyphen
  only) in the whole answer; else the first number of each keyword sentence, paired. The first pair, sorted. Its
  ``h:mm:ss`` rule (:68-86) crashes upstream (``t`` is a tuple, :74-84) and is left out, so clocks give nothing.
- ``lmms_eval`` (LE charades_sta/utils.py:84-144, the scorer lmms-eval runs in the harness): no keyword sentence
  means all sentences; in order ``m:ss``/``h:mm:ss`` ranges, ``A - B`` or ``A – B`` (en dash), clock times paired,
  first numbers paired, ``12s - 15s``; the first pair, sorted.

An answer with no pair scores IoU 0 (VCF eval_tvg.py:125-127 replaces it by ``[gt_end + 10, gt_end + 20]``; LE
utils.py:180-183 sets 0) and is counted under ``invalid``. IoU is ``overlap / (max end - min start)`` (VCF
eval_tvg.py:101-106; a zero denominator is 0 as LE :155-161). Metrics in percent: ``R@0.3``, ``R@0.5``, ``R@0.7``
(IoU >= t, VCF eval_tvg.py:117-132) and ``mIoU`` (LE :170-198; VideoChat-Flash's script prints no mIoU).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

from pipeline.eval.benchmarks.base import Benchmark, InputError, skipped
from pipeline.eval.benchmarks.mcq import read_predictions as _read_jsonl_predictions

VARIANTS = ("videochat_flash", "lmms_eval")
THRESHOLDS = (0.3, 0.5, 0.7)

# VCF temporal_grounding/charades.yaml:9-10 (= LE charades_sta/charades.yaml)
PRE_PROMPT = (
    "Please find the visual event described by a sentence in the video, determining its starting and ending times. "
    "The format should be: 'The event happens in the start time - end time'. For example, The event 'person turn a "
    "light on' happens in the 24.3 - 30.4 seonds. Now I will give you the textual sentence: "
)
POST_PROMPT = "Please return its start time and end time."

_EXAMPLE = "A specific example is : 20.8 - 30.0 seconds".lower()
_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")
_SENTENCES = re.compile(r"[!?\n]")
# VCF eval_tvg.py:42, :58
_VCF_RANGE = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")
_VCF_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")
# LE charades_sta/utils.py:95-99
_LE_CLOCK_RANGE = re.compile(r"\b(\d{1,2}:\d{2}(?::\d{2})?)\s*[–-]\s*(\d{1,2}:\d{2}(?::\d{2})?)\b")
_LE_RANGE = re.compile(r"(\d+(?:\.\d+)?)\s*[–-]\s*(\d+(?:\.\d+)?)")
_LE_NUMBER = re.compile(r"\b(\d+(?:\.\d+)?)\b")
_LE_CLOCK = re.compile(r"\b(\d{1,2}:\d{2}(?::\d{2})?)\b")
_LE_FALLBACK = re.compile(r"(\d+(?:\.\d+)?)\s*s?\s*[–-]\s*(\d+(?:\.\d+)?)\s*s?")


def _pairs(times: list[float]) -> list[tuple[float, float]]:
    times = times[: len(times) // 2 * 2]
    return [(times[i], times[i + 1]) for i in range(0, len(times), 2)]


def _clock(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return parts[0] * 3600 + parts[1] * 60 + parts[2] if len(parts) == 3 else parts[0] * 60 + parts[1]


def _first_numbers(sentences: list[str], number: re.Pattern) -> list[tuple[float, float]]:
    """The first number ``number`` finds in each sentence that has one, paired."""
    return _pairs([float(found[0]) for found in (number.findall(s) for s in sentences) if found])


def _first_ranges(sentences: list[str], pattern: re.Pattern, convert: Callable[[str], Any] = float) -> list[tuple]:
    """Every ``(start, end)`` range ``pattern`` finds in the first sentence where it finds any, ``convert``-ed."""
    for s in sentences:
        found = pattern.findall(s)
        if found:
            return [(convert(a), convert(b)) for a, b in found]
    return []


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "1..5": upstream raises; here the answer is unparsable
        return None


def extract_time(answer: str, variant: str = "videochat_flash") -> list[float] | None:
    """The ``[start, end]`` (seconds, sorted) ``variant``'s ``extract_time`` reads from a free-text answer
    (VCF temporal_grounding/eval_tvg.py:24-95 or LE charades_sta/utils.py:84-144), or ``None`` if none.

    Raises:
        ValueError: unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    text = answer.lower().replace(_EXAMPLE, "").replace("to", "-")
    sentences = _SENTENCES.split(text)
    cands = [s for s in sentences if any(k in s for k in _KEYWORDS)]
    if variant == "videochat_flash":
        stamps = [(_float(a), _float(b)) for a, b in _VCF_RANGE.findall(text)] or _first_numbers(cands, _VCF_NUMBER)
        # The clock rule (eval_tvg.py:68-86) reads t = a tuple of findall groups, t.count(':') is 0 and the script
        # fails with UnboundLocalError at :84; it never yields a span, so it is left out.
    else:
        cands = cands or sentences
        stamps = (_first_ranges(cands, _LE_CLOCK_RANGE, _clock) or _first_ranges(cands, _LE_RANGE)
                  or _pairs([_clock(t) for s in cands for t in _LE_CLOCK.findall(s)])
                  or _first_numbers(cands, _LE_NUMBER) or _first_ranges(cands, _LE_FALLBACK))  # fmt: skip
    if not stamps or stamps[0][0] is None or stamps[0][1] is None:
        return None
    start, end = stamps[0]
    return [start, end] if end > start else [end, start]


def iou(a: list[float], b: list[float]) -> float:
    """Temporal IoU of two ``[start, end]`` spans: ``max(min end - max start, 0) / (max end - min start)``, 0 when
    the denominator is not positive (VCF temporal_grounding/eval_tvg.py:101-106, LE charades_sta/utils.py:155-161)."""
    denom = max(a[1], b[1]) - min(a[0], b[0])
    return 0.0 if denom <= 0 else max(min(a[1], b[1]) - max(a[0], b[0]), 0) / denom


def submission_key(video: str, caption: str, timestamp: Any) -> str:
    """lmms-eval's submission key ``f"{video}>>>{caption}>>>{timestamp}"`` (VCF temporal_grounding/utils.py:49)."""
    return f"{video}>>>{caption}>>>{timestamp}"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"not JSON ({e.msg})") from None


def _span(value: Any) -> list[float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    return [float(value[0]), float(value[1])]


def _item(id_: str, video: str, query: str, span: list[float]) -> dict:
    return {"id": id_, "video": video, "prompt": f"{PRE_PROMPT}{query}. {POST_PROMPT}",
            "answer": f"{span[0]:g} {span[1]:g}", "span": span, "task": None, "duration": None}  # fmt: skip


def load_charades_sta(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Charades-STA: a JSON list of ``{video, caption, timestamp: [s, e]}`` (a dict of such records is accepted too).
    Item id the submission key (:func:`submission_key`), ``span`` ``[s, e]`` seconds, ``answer`` ``"s e"``.

    Raises:
        InputError: unreadable, not JSON, or not a list of records.
    """
    path = Path(path)
    data = _read(path)
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list):
        raise InputError(path, "expected a list of {video, caption, timestamp}")
    items, bad, seen = [], [], set()
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            bad.append(skipped(path, i, "record", "not an object"))
            continue
        missing = [f for f in ("video", "caption") if not isinstance(rec.get(f), str)]
        if missing:
            bad.append(skipped(path, i, missing[0], "missing or not a string"))
            continue
        span = _span(rec.get("timestamp"))
        if span is None:
            bad.append(skipped(path, i, "timestamp", "missing or not [start, end]"))
            continue
        key = submission_key(rec["video"], rec["caption"], rec["timestamp"])
        if key in seen:
            bad.append(skipped(path, i, "id", "duplicate submission key"))
            continue
        seen.add(key)
        items.append(_item(key, rec["video"], rec["caption"], span))
    return items, bad


def load_grounding(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Our generic layout: a JSON list of ``{id, video, query, start, end}`` (seconds); Charades-STA's prompt.

    Raises:
        InputError: unreadable, not JSON, or not a list.
    """
    path = Path(path)
    data = _read(path)
    if not isinstance(data, list):
        raise InputError(path, "expected a list of {id, video, query, start, end}")
    items, bad, seen = [], [], set()
    for i, rec in enumerate(data):
        record = rec.get("id", i) if isinstance(rec, dict) else i
        if not isinstance(rec, dict):
            bad.append(skipped(path, record, "record", "not an object"))
            continue
        field = next((f for f in ("id", "video", "query") if not isinstance(rec.get(f), (str, int))
                      or isinstance(rec.get(f), bool)), None)  # fmt: skip
        if field is None:
            field = next((f for f in ("start", "end") if _span([rec.get(f), 0]) is None), None)
        if field is not None:
            bad.append(skipped(path, record, field, "missing or of the wrong type"))
            continue
        if str(rec["id"]) in seen:
            bad.append(skipped(path, record, "id", "duplicate id"))
            continue
        seen.add(str(rec["id"]))
        items.append(_item(str(rec["id"]), rec["video"], rec["query"], [float(rec["start"]), float(rec["end"])]))
    return items, bad


def read_predictions(path: str | Path) -> dict[str, str]:
    """Predictions ``{id: text}``: lmms-eval's submission dict ``{"video>>>caption>>>[s, e]": text}``, or our JSON
    lines / list of ``{"id", "prediction"}``.

    Raises:
        InputError: unreadable, not JSON, or records of the wrong shape.
    """
    return _read_jsonl_predictions(path)


def score(items: list[dict], predictions: dict[str, str], variant: str = "videochat_flash", **_: Any) -> dict:
    """R@0.3/0.5/0.7 and mIoU (percent) of ``predictions`` on ``items`` (each with ``span``).

    Returns:
        ``{"variant", "units": "percent", "overall" (= R@0.5), "R@0.3", "R@0.5", "R@0.7", "mIoU", "count",
        "unanswered", "invalid", "unknown_predictions"}``; unanswered and invalid items score IoU 0.

    Raises:
        ValueError: unknown variant.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    ious = []
    unanswered = invalid = 0
    for item in items:
        text = predictions.get(item["id"])
        if text is None:
            unanswered += 1
            ious.append(0.0)
            continue
        pred = extract_time(text, variant)
        if pred is None:
            invalid += 1
            ious.append(0.0)
            continue
        ious.append(iou(item["span"], pred))
    n = len(ious)
    out: dict[str, Any] = {"variant": variant, "units": "percent"}
    for t in THRESHOLDS:
        out[f"R@{t}"] = 100.0 * sum(1 for v in ious if v >= t) / n if n else 0.0
    out["mIoU"] = 100.0 * sum(ious) / n if n else 0.0
    out["overall"] = out["R@0.5"]
    ids = {item["id"] for item in items}
    out.update(count=n, unanswered=unanswered, invalid=invalid,
               unknown_predictions=sum(1 for k in predictions if k not in ids))  # fmt: skip
    return out


BENCHMARKS: dict[str, Benchmark] = {
    "charades_sta": Benchmark("charades_sta", "grounding", load_charades_sta, score, read_predictions, VARIANTS),
    "grounding": Benchmark("grounding", "grounding", load_grounding, score, read_predictions, VARIANTS),
}
