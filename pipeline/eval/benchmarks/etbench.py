"""E.T. Bench (Liu et al., 2024): its 12 tasks scored as its ``evaluation/compute_metrics.py`` scores them.

Sources. The scorer is ETBench ``evaluation/compute_metrics.py`` (PolyU-ChenLab's Hugging Face data set repo; the copy
read has 975 lines and writes ``metrics.json``); a citation ``ETBench evaluation/compute_metrics.py:N`` is its line
N, and a bare ``:N`` inside a function means the same file. The record format is ETBench ``docs/BENCHMARK.md`` (GitHub
repo PolyU-ChenLab/ETBench), the reference inference script ``etchat/eval/infer_etbench.py`` of the same repo.

Records. ``etbench_txt_v1.0.json`` / ``etbench_vid_v1.0.json`` hold a list of dicts ``version, idx, task, source,
video, duration, src, tgt, p, o, g, q`` (``tgt``/``src``/``duration`` in seconds); a prediction file is that list with
the model's raw text answer added as ``a`` (docs/BENCHMARK.md). ``tgt`` is ``[s, e]`` for tvg/epm/gvq, a list of
``[s, e]`` for tem/tal/evs/dvc/slc and a list of ``[s, e]`` (or one such list per annotator) for vhd.

Tasks and metrics (all fractions in [0, 1], rounded to 5 decimals as ETBench evaluation/compute_metrics.py:443-446):

- ``rar``, ``eca``, ``rvq``: ``Acc`` of the option letter read from the answer (:591-652; eca is scored as rvq, :854).
- ``tvg``, ``epm``: the first span in the answer; ``F1@t`` is the fraction of samples whose IoU >= t (it is Recall@1
  under the name F1), ``F1`` their mean over t in 0.1/0.3/0.5/0.7, ``mIoU`` (:418-447).
- ``tal``: per sample, precision/recall of the answer's spans at IoU t (a span or ground truth counts when its best
  IoU >= t; no one-to-one matching) and their F1, averaged over all samples (:509-539).
- ``evs``: per-second F1 of the union of answered spans against the ground truth on a 1000-second grid (:542-588).
- ``vhd``: hit rate of the first number in the answer falling inside any ground-truth span (named ``F1``, :450-474).
- ``dvc``, ``slc``: dense-captioning F1 from detection precision/recall at IoU t, and BLEU-1..4, METEOR, ROUGE-L, CIDEr
  (pycocoevalcap) and SentSim (all-MiniLM-L6-v2 dot product) of captions paired by IoU (:63-209, :738-777).
- ``tem``: the first span's best IoU over the ground-truth spans: ``R@t``, ``mRec``, ``mIoU`` (:477-506).
- ``gvq``: ``Acc`` of the option, then ``R@t``/``mRec``/``mIoU`` of the first span, counted only on samples whose
  option was right (:655-735).

Output (the layout is in :func:`evaluate`): ``metrics`` is exactly compute_metrics.py's ``metrics.json``
(``{task: {source: {...}}}``, :975); ``tasks``, ``groups``, ``overall`` and ``merged`` are the numbers it only logs
(:868-972), ``overall``/``merged`` in percent rounded to 1 decimal as there.

Added here, not upstream: malformed answers never crash and are counted by reason (``invalid``); an answer's span
that starts at or after the video's ``duration`` scores as wrong (``timestamp past video end``); metrics whose tool
is missing (Java, pycocoevalcap, sentence-transformers or its model) are ``null`` and explained in ``not_computed``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import string
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from pipeline.eval.benchmarks.base import InputError  # re-exported: etbench.InputError

UPSTREAM = "ETBench evaluation/compute_metrics.py"

# ETBench evaluation/compute_metrics.py:419, :478, :510, :703, :739
IOU_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)
# ETBench evaluation/compute_metrics.py:31
SENTSIM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# ETBench evaluation/compute_metrics.py:67 (DVCEval's max_proposals)
MAX_PROPOSALS = 1000
# ETBench evaluation/compute_metrics.py:553, :561 (the per-second grid of evs)
EVS_SECONDS = 1000
# ETBench evaluation/compute_metrics.py:213 (a lone time point becomes a window of +-20 s)
POINT_RADIUS = 20
# ETBench evaluation/compute_metrics.py:762 and :775 (captioning score keys, in order)
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SentSim")

# The task groups and the order compute_metrics.py reports them in (:870, :888, :910, :936).
GROUPS = {
    "Referring": ("rar", "eca", "rvq"),
    "Grounding": ("tvg", "epm", "tal", "evs", "vhd"),
    "Captioning": ("dvc", "slc"),
    "Complex": ("tem", "gvq"),
}
TASKS = tuple(task for tasks in GROUPS.values() for task in tasks)

# The columns of the "Overall" table (:957-958), each (task, metric of ``tasks``). 'EVC (Acc)' is upstream's label
# for eca, kept verbatim.
OVERALL = (
    ("RAR (Acc)", "rar", "Acc"),
    ("EVC (Acc)", "eca", "Acc"),
    ("RVQ (Acc)", "rvq", "Acc"),
    ("TVG (F1)", "tvg", "F1"),
    ("EPM (F1)", "epm", "F1"),
    ("TAL (F1)", "tal", "F1"),
    ("EVS (F1)", "evs", "F1"),
    ("VHD (F1)", "vhd", "F1"),
    ("DVC (F1)", "dvc", "F1"),
    ("DVC (Sim)", "dvc", "SentSim"),
    ("SLC (F1)", "slc", "F1"),
    ("SLC (Sim)", "slc", "SentSim"),
    ("TEM (Rec)", "tem", "mRec"),
    ("GVQ (Rec)", "gvq", "mRec"),
)
# The "Merged" table (:962-972): each column is the mean of these overall columns (percent, 1 decimal).
MERGED = {
    "Acc (ref)": ("RAR (Acc)", "EVC (Acc)", "RVQ (Acc)"),
    "F1 (gnd)": ("TVG (F1)", "EPM (F1)", "TAL (F1)", "EVS (F1)", "VHD (F1)"),
    "F1 (cap)": ("DVC (F1)", "SLC (F1)"),
    "Sim (cap)": ("DVC (Sim)", "SLC (Sim)"),
    "Rec (com)": ("TEM (Rec)", "GVQ (Rec)"),
}

# Invalid-answer reasons, as counted under ``invalid``.
MISSING_PREDICTION = "missing prediction"
MISSING_ANSWER = "missing a"
NOT_A_STRING = "a is not a string"
EMPTY_ANSWER = "empty a"
NO_TIMESTAMP = "no timestamp"
UNPARSABLE_TIMESTAMP = "unparsable timestamp"
PAST_END = "timestamp past video end"
NO_LETTER = "no option letter"
BAD_LETTER = "option letter not among options"

_SPAN_TASKS = {"tvg", "epm", "gvq"}  # tgt is one [s, e]
_MULTI_SPAN_TASKS = {"tem", "tal", "evs", "dvc", "slc"}  # tgt is a list of [s, e]
_CHOICE_TASKS = {"rar", "eca", "rvq", "gvq"}
_CAPTION_TASKS = {"dvc", "slc"}


# ---------------------------------------------------------------------------------------------------------------
# Temporal IoU


def _numpy_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU in float32 with nncore.ops.temporal_iou's arithmetic (inter / (area_a + area_b - inter))."""
    inter = np.clip(np.minimum(a[:, None, 1], b[:, 1]) - np.maximum(a[:, None, 0], b[:, 0]), 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / ((a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0]) - inter)


def _nncore_iou() -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    try:
        import torch
        from nncore.ops import temporal_iou
    except ImportError:
        return None

    def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return temporal_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()

    return iou


_IOU_BACKENDS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray] | None] = {}


def iou_backend(name: str = "auto") -> tuple[str, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """The temporal-IoU implementation: ``"nncore"`` (what compute_metrics.py imports, ETBench
    evaluation/compute_metrics.py:16), ``"numpy"`` (the same float32 arithmetic), or ``"auto"`` (nncore when it
    imports, else numpy).

    Returns:
        ``(name, function)``; the function maps float32 arrays ``(N, 2)`` and ``(M, 2)`` of ``[start, end]`` seconds
        to the ``(N, M)`` IoU matrix.

    Raises:
        ValueError: ``name`` is unknown, or ``"nncore"`` was asked for and nncore or torch does not import.
    """
    if name not in ("auto", "nncore", "numpy"):
        raise ValueError(f"unknown IoU backend {name!r}")
    if name in ("auto", "nncore"):
        if "nncore" not in _IOU_BACKENDS:
            _IOU_BACKENDS["nncore"] = _nncore_iou()
        if _IOU_BACKENDS["nncore"] is not None:
            return "nncore.ops.temporal_iou", _IOU_BACKENDS["nncore"]
        if name == "nncore":
            raise ValueError("nncore (or torch) is not installed")
    return "numpy", _numpy_iou


def temporal_iou(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], backend: str = "auto") -> np.ndarray:
    """Pairwise temporal IoU of spans ``a`` (N) and ``b`` (M), each ``[start, end]`` in seconds.

    Computed in float32 as compute_metrics.py does (it builds ``torch.Tensor``s, e.g. ETBench
    evaluation/compute_metrics.py:431-433), so thresholds compare as upstream (an IoU of 7/10 is 0.69999999 < 0.7).
    A non-finite IoU (two zero-length spans) is 0, as in ETBench etchat/eval/eval_grounding.py:35.

    Returns:
        ``(N, M)`` float32 array.

    Raises:
        ValueError: an unknown ``backend`` (see :func:`iou_backend`).
    """
    _, fn = iou_backend(backend)
    a32 = np.asarray(a, dtype=np.float32).reshape(-1, 2)
    b32 = np.asarray(b, dtype=np.float32).reshape(-1, 2)
    iou = fn(a32, b32)
    return np.where(np.isfinite(iou), iou, np.float32(0)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Reading answers

_RANGE = re.compile(r"(\d+\.*\d*)\s*-\s*(\d+\.*\d*)")  # :353, :246
_RANGE_TEXT = re.compile(r"(\d+\.*\d*\s*-\s*\d+\.*\d*)")  # :246 (the same, as one group)
_RANGE_TO = re.compile(r"(\d+\.*\d*)\s* to \s*(\d+\.*\d*)")  # :361
_KEYWORDS = ("starts", "ends", "happens in", "start time", "end time", "start", "end", "happen")  # :346
_FIRST_NUMBER = re.compile(r"\b(\d+\.\d+\b|\b\d+)\b")  # :371
_POINT = re.compile(r"[-+]?\d*\.\d+|[-+]?\d+")  # :457
_PAREN_LETTER = re.compile(r"\(([A-Za-z])\)")  # :605


class _Unparsable(ValueError):
    """A number pattern matched but is not a finite float (``'1..5'``, or 400 digits)."""


def _number(text: str | float) -> float:
    try:
        value = float(text)
    except ValueError as e:
        raise _Unparsable(str(e)) from None
    if not math.isfinite(value):
        raise _Unparsable(f"{text!r} is not finite")
    return value


def _pairs(times: list) -> list:
    times = times[: len(times) // 2 * 2]
    return [(times[i], times[i + 1]) for i in range(0, len(times), 2)]


def read_spans(answer: str) -> tuple[list[list[float]] | None, str | None]:
    """The ``[start, end]`` spans (seconds) in a free-text answer, as ``tvg_format`` reads them (ETBench
    evaluation/compute_metrics.py:342-415); used for tvg, epm, tal, evs, tem and gvq.

    In order, the first rule that finds anything wins: every ``A - B`` in the answer (``\\d+\\.*\\d*``, so ``0:15 -
    0:30`` reads as ``15 - 0``); every ``A to B``; the first number of each sentence (split at ``!``, ``?``, newline,
    not ``.``) that holds a keyword (start, end, happen...), paired in order, an odd last one dropped. Each pair is
    sorted to ``[min, max]``. Upstream's last rule (hh:mm:ss clocks, :379-396) can never add a span (see the comment
    in the code), so clock answers such as ``0:01:05`` give no timestamp; so it is here.

    Returns:
        ``(spans, None)``, or ``(None, reason)`` with reason ``"no timestamp"``, or ``"unparsable timestamp"`` when a
        matched number is not a finite float (upstream raises ``ValueError`` there).
    """
    text = answer.lower()
    sentences = re.split(r"[!?\n]", text)  # :344
    candidates = [s for s in sentences if any(k in s for k in _KEYWORDS)]
    try:
        pairs: list = [(_number(a), _number(b)) for a, b in _RANGE.findall(text)]
        if not pairs:
            pairs = [(_number(a), _number(b)) for a, b in _RANGE_TO.findall(text)]
        if not pairs:
            times = [_number(found[0]) for found in map(_FIRST_NUMBER.findall, candidates) if found]
            pairs = _pairs(times)
        # The hh:mm:ss rule (:379-396) cannot add a span: re.findall returns (clock, clock) tuples there, which hold
        # no ':', so each keyword sentence with a clock re-appends the last number of the rule above; that rule left
        # no pair only if it found at most one number, so at most one time, and an odd last time is dropped.
    except _Unparsable:
        return None, UNPARSABLE_TIMESTAMP
    spans = [[s, e] if e > s else [e, s] for s, e in pairs]  # :397-402
    if not spans:
        return None, NO_TIMESTAMP
    return spans, None


def _time_part(text: str) -> list[str]:
    """``extract_time_part`` (ETBench evaluation/compute_metrics.py:212-241): ``"A - B"`` strings from a fragment.

    Raises ``IndexError``/``ValueError`` where upstream does (its caller skips the fragment then).
    """
    found = re.findall(r"\d+\.*\d*\s*-\s*\d+\.*\d*", text)
    if not found:
        if text.count(":") == 1:
            clock = re.findall(r"\d+\.*\d*:\d+\.*\d*", text)[0]
            t = int(clock.split(":")[0]) * 60 + int(clock.split(":")[1])
            found = [
                f"{t - POINT_RADIUS} - {t + POINT_RADIUS}" if t > POINT_RADIUS else f"{t} - {t + 2 * POINT_RADIUS}"
            ]
        elif text.count(":") == 2:
            start, end = re.findall(r"\d+\.*\d*:\d+\.*\d*", text)
            start_s = int(start.split(":")[0]) * 60 + int(start.split(":")[1])
            end_s = int(end.split(":")[0]) * 60 + int(end.split(":")[1])
            found = [f"{start_s} - {end_s}"]
    if not found:
        found = re.findall(r"\d+\.*\d*(?!\.)", text)
        if len(found) == 1:
            t = float(found[0])
            found = [
                f"{t - POINT_RADIUS} - {t + POINT_RADIUS}" if t > POINT_RADIUS else f"{t} - {t + 2 * POINT_RADIUS}"
            ]
        elif len(found) == 2:
            found = [f"{found[0]} - {found[1]}"]
    return found


def _paragraph(paragraph: str) -> tuple[list, list[str]]:
    """``extract_time_from_paragraph`` (ETBench evaluation/compute_metrics.py:244-289); raises where upstream does."""
    paragraph = paragraph.lower()
    spans: list = []
    captions: list[str] = []
    matches = _RANGE.findall(paragraph)
    if matches:
        spans = [[_number(s), _number(e)] for s, e in matches]
        rest = paragraph
        for matched in _RANGE_TEXT.findall(paragraph):
            rest = rest.replace(matched, "\n")
        captions = rest.replace("seconds", "").split("\n")
    if not spans:
        flags = re.DOTALL | re.IGNORECASE
        ends = re.findall(r"(?:end(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", paragraph, flags)
        starts = re.findall(r"(?:start(?:ing)? time: (\d+\.*\d*)(?:s| seconds)?)", paragraph, flags)
        if starts and ends:
            spans = [[_number(s), _number(e)] for s, e in zip(starts, ends)]
            captions = re.findall(r"description: (.*)", paragraph)
            if not captions:
                captions = re.findall(r"\*\s*(.*)", paragraph)
    if not spans and re.findall(r"start time (\d+\.*\d*), end time (\d+\.*\d*)", paragraph):
        # :274-281 fills the timestamps and then asserts there are none: this format always fails.
        raise AssertionError("'start time A, end time B' answers always fail upstream")
    captions = [c.strip().strip(", ").rstrip() for c in captions if len(c) > 5]
    n = min(len(spans), len(captions))
    return spans[:n], captions[:n]


def read_captions(answer: str) -> tuple[list[list[float]] | None, list[str] | None]:
    """The ``[start, end]`` spans (seconds) and captions of a dense-captioning answer, as ``dvc_format`` reads them
    (ETBench evaluation/compute_metrics.py:292-339).

    First ``extract_time_from_paragraph``: every ``A - B`` splits the lower-cased answer, the text pieces longer than
    5 characters (before stripping) are the captions, paired with the spans in order and both cut to the shorter
    list (so a caption written before its timestamp pairs with the previous one); then ``start time: A`` / ``end
    time: B`` with ``description: ...`` lines. Failing that, the answer is cut at newlines (or at ``.``), and only the
    first piece longer than 7 characters whose text before ``seconds`` holds a time becomes one span: ``A - B``,
    ``m:ss`` or a lone number ``t`` as ``t +- 20`` (``[t, t + 40]`` when t <= 20), two ``m:ss`` or two numbers as a
    span. Upstream's third format (``start time A, end time B``) always fails an assertion (:281); reproduced.

    Returns:
        ``(spans, captions)`` of equal length >= 1, each span ``[min, max]``; ``(None, None)`` when nothing is read.
    """
    try:
        spans, sentences = _paragraph(answer)
    except Exception:  # :297-300: any error while reading the paragraph fails the answer
        return None, None
    if not spans:
        if "\n" in answer:
            pieces = [c for c in answer.split("\n") if len(c) > 7]
        else:
            pieces = [c + "." for c in answer.split(".") if len(c) > 7]
        for piece in pieces:
            if spans:  # :312: later pieces are looked at but never read
                break
            try:
                parts = [p.strip(",") for p in piece.split("seconds")]
                found = _time_part(parts[0])
                if not found:
                    continue
                start = round(_number(found[0].split("-")[0].strip()), 2)
                end = round(_number(found[0].split("-")[1].strip()), 2)
                spans.append([start, end])
                sentences.append(parts[-1].strip())
            except Exception:  # :326-327
                continue
    if not spans:
        return None, None
    return [[min(s), max(s)] for s in spans], sentences


def read_point(answer: str) -> float | None:
    """The first number in a vhd answer (seconds), or None (ETBench evaluation/compute_metrics.py:457-462)."""
    match = _POINT.search(answer)
    return float(match.group(0)) if match else None


@dataclass
class Choice:
    """An option read from a multiple-choice answer.

    Attributes:
        index: the option's 0-based index, or None when the answer holds no usable letter.
        fallback: the text compute_metrics.py then compares with each ``"(L) option"`` by sentence similarity, or
            None when it gives the answer up (empty).
        failed: whether compute_metrics.py counts the answer in ``Failed``.
        reason: why no letter was read (``"empty a"``, ``"no option letter"``, ``"option letter not among
            options"``), None when one was.
    """

    index: int | None
    fallback: str | None = None
    failed: bool = False
    reason: str | None = None


def read_choice(answer: str, n_options: int) -> Choice:
    """The option letter of a rar/eca/rvq answer, as ``rvq_eval`` reads it (ETBench
    evaluation/compute_metrics.py:600-645).

    The first ``(X)`` anywhere in the answer wins when X is among the ``n_options`` letters; otherwise the lower-cased
    answer loses a leading ``best option:`` (the prefix E.T. Chat's inference script puts in the prompt, ETBench
    etchat/eval/infer_etbench.py:67) and leading spaces and ``(``, and its first character is the letter when it is
    alone or followed by ``.``, ``,``, space or ``)`` (so ``"A cat ..."`` reads as option A). ``"The answer is B"``
    holds no letter: upstream then picks the option most similar to the answer (``fallback``).

    Args:
        answer: the model's text.
        n_options: how many options the letters a, b, ... stand for (upstream takes it from the source's first
            sample, :592-597).

    Returns:
        a :class:`Choice`.
    """
    letters = string.ascii_lowercase[:n_options]
    reason = None
    match = _PAREN_LETTER.search(answer)
    ever_matched = bool(match)
    if match:
        if match.group(1).lower() in letters:
            return Choice(letters.index(match.group(1).lower()))
        reason = BAD_LETTER
    text = answer.lower()
    if text.startswith("best option:"):
        text = text[12:]
    text = text.lstrip().lstrip("(").lstrip()
    if not text:
        return Choice(None, failed=True, reason=EMPTY_ANSWER if not answer.strip() else NO_LETTER)
    if len(text) == 1 or text[1] in (".", ",", " ", ")"):
        ever_matched = True
        if text[0] in letters:
            return Choice(letters.index(text[0]))
        reason = BAD_LETTER
    return Choice(None, fallback=text, failed=not ever_matched, reason=reason or NO_LETTER)


def read_gvq_choice(answer: str, n_options: int) -> Choice:
    """The option letter of a gvq answer, as ``gvq_eval`` reads it (ETBench evaluation/compute_metrics.py:659-697).

    Unlike :func:`read_choice` there is no ``(X)`` search and the answer keeps its case: a leading ``best option:``
    (any case), spaces and ``(`` are dropped and the first character is the letter when it is alone or followed by
    ``.``, ``,``, space or ``)``. Otherwise upstream picks the most similar option (``fallback``) without counting
    the answer as failed; an empty answer is failed.

    Args:
        answer: the model's text.
        n_options: the sample's own number of options (:670-675).

    Returns:
        a :class:`Choice`.
    """
    letters = string.ascii_lowercase[:n_options]
    text = answer
    if text.lower().startswith("best option:"):
        text = text[12:]
    text = text.lstrip().lstrip("(").lstrip()
    if not text:
        return Choice(None, failed=True, reason=EMPTY_ANSWER if not answer.strip() else NO_LETTER)
    reason = NO_LETTER
    if len(text) == 1 or text[1] in (".", ",", " ", ")"):
        if text[0].lower() in letters:
            return Choice(letters.index(text[0].lower()))
        reason = BAD_LETTER
    return Choice(None, fallback=text, reason=reason)


# ---------------------------------------------------------------------------------------------------------------
# Optional tools: sentence similarity, pycocoevalcap and Java


class Similarity(Protocol):
    """What the scorer needs of a sentence-similarity model."""

    def similarity(self, a: str, b: str) -> float:
        """The similarity of two texts (``compute_sim``, ETBench evaluation/compute_metrics.py:33-37)."""

    def paired_mean(self, refs: list[str], hyps: list[str]) -> float:
        """The mean similarity of ``refs[i]`` and ``hyps[i]`` (``compute_score``, :39-53)."""


class SentenceTransformerSimilarity:
    """Dot products of sentence-transformers embeddings (ETBench evaluation/compute_metrics.py:28-53)."""

    def __init__(self, model: Any):
        self.model = model

    def similarity(self, a: str, b: str) -> float:
        """``compute_sim``: the dot product of the two texts' embeddings (cosine for all-MiniLM-L6-v2)."""
        emb = np.asarray(self.model.encode([a, b]), dtype=np.float32)
        return float(emb[0] @ emb[1])

    def paired_mean(self, refs: list[str], hyps: list[str]) -> float:
        """``compute_score``: the mean of ``dot(emb(refs[i]), emb(hyps[i]))``."""
        a = np.asarray(self.model.encode(refs), dtype=np.float32)
        b = np.asarray(self.model.encode(hyps), dtype=np.float32)
        return float(np.mean(np.sum(a * b, axis=1)))


def load_similarity(
    model: str = SENTSIM_MODEL, *, allow_download: bool = False, device: str | None = None
) -> tuple[Similarity | None, str | None]:
    """Load the sentence-similarity model compute_metrics.py uses (all-MiniLM-L6-v2, ETBench
    evaluation/compute_metrics.py:31).

    Args:
        model: a Hugging Face model id or a local folder holding a sentence-transformers model.
        allow_download: whether the hub may be asked; off by default (a model id must then be in the local cache).
        device: torch device for the model, None for sentence-transformers' choice.

    Returns:
        ``(similarity, None)`` or ``(None, reason)``; never raises.
    """
    local = Path(model).is_dir()
    if not local and not allow_download:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None, "huggingface_hub is not installed"
        if not isinstance(try_to_load_from_cache(model, "modules.json"), str):
            return None, f"model {model} is not in the local Hugging Face cache and downloading is off"
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None, "sentence-transformers is not installed (pip install '.[etbench]')"
    try:
        st = SentenceTransformer(model, device=device, local_files_only=not allow_download)
    except Exception as e:  # noqa: BLE001 - any loading failure is reported, not raised
        return None, f"sentence-transformers could not load {model}: {type(e).__name__}: {_one_line(e)}"
    return SentenceTransformerSimilarity(st), None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


class _LazySimilarity:
    """Loads the similarity model on first use, so runs that never need it never import sentence-transformers."""

    def __init__(self, similarity: Similarity | None | str, model: str, allow_download: bool, device: str | None):
        self._value: Similarity | None = None
        self._reason: str | None = None
        self.loaded = False
        if isinstance(similarity, str):
            self._args = (model, allow_download, device)
        else:
            self.loaded = True
            self._value = similarity  # type: ignore[assignment]
            self._reason = None if similarity is not None else "sentence similarity was turned off"

    def get(self) -> tuple[Similarity | None, str | None]:
        if not self.loaded:
            model, allow_download, device = self._args
            self._value, self._reason = load_similarity(model, allow_download=allow_download, device=device)
            self.loaded = True
        return self._value, self._reason


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (the Java tokenizer prints a progress line there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CaptionTools:
    """pycocoevalcap's PTB tokenizer and scorers, as far as they run here.

    compute_metrics.py tokenizes every caption with pycocoevalcap's PTBTokenizer (Stanford CoreNLP, a Java program)
    before BLEU, METEOR, ROUGE-L, CIDEr and SentSim (ETBench evaluation/compute_metrics.py:74-76, :181-182); METEOR is
    meteor-1.5.jar, also Java. So without Java none of the caption text metrics can be computed; the detection F1 can.

    Attributes:
        reasons: metric name -> why it cannot be computed (empty when all can).
    """

    def __init__(self, java: bool = True):
        self.reasons: dict[str, str] = {}
        self._meteor: Any = None
        try:
            from pycocoevalcap.meteor import meteor
            from pycocoevalcap.tokenizer import ptbtokenizer
        except ImportError:
            for key in CAPTION_METRICS:
                self.reasons[key] = "pycocoevalcap is not installed (pip install '.[etbench]')"
            return
        tokenizer_dir, meteor_dir = Path(ptbtokenizer.__file__).parent, Path(meteor.__file__).parent
        if not java or shutil.which("java") is None:
            why = "needs Java (pycocoevalcap's PTBTokenizer, stanford-corenlp-3.4.1.jar, runs under java): not found"
            for key in CAPTION_METRICS:
                self.reasons[key] = why
            self.reasons["METEOR"] = (
                "needs Java (pycocoevalcap's meteor-1.5.jar and PTBTokenizer run under java): not found"
            )
            return
        if not (tokenizer_dir / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR).is_file():
            for key in CAPTION_METRICS:
                self.reasons[key] = f"pycocoevalcap's tokenizer jar is missing from {tokenizer_dir}"
            return
        if not (meteor_dir / meteor.METEOR_JAR).is_file():
            self.reasons["METEOR"] = f"pycocoevalcap's meteor-1.5.jar is missing from {meteor_dir}"

    def tokenize(self, texts: dict[Any, str]) -> dict[Any, str] | None:
        """PTB-tokenize ``texts`` (lower-cased, punctuation dropped) in one Java run; None after marking every text
        metric not computed when the tokenizer fails. Empty texts are not sent (they tokenize to ``""``)."""
        if "Bleu_1" in self.reasons:
            return None
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        out = {k: "" for k in texts}
        todo = {k: [{"caption": v}] for k, v in texts.items() if v.strip()}
        if not todo:
            return out
        try:
            with _quiet_stderr():  # upstream passes verbose=False (:74); the PyPI release has no such switch
                tokens = PTBTokenizer().tokenize(todo)
        except Exception as e:  # noqa: BLE001
            for key in CAPTION_METRICS:
                self.reasons[key] = f"pycocoevalcap's PTBTokenizer failed: {type(e).__name__}: {_one_line(e)}"
            return None
        for k in todo:
            out[k] = tokens.get(k, [""])[0]
        return out

    def meteor(self) -> Any:
        """The shared METEOR scorer (one Java process), started on first use; None when it cannot run."""
        if "METEOR" in self.reasons:
            return None
        if self._meteor is None:
            try:
                from pycocoevalcap.meteor.meteor import Meteor

                self._meteor = Meteor()
            except Exception as e:  # noqa: BLE001
                self.reasons["METEOR"] = f"meteor-1.5.jar did not start: {type(e).__name__}: {_one_line(e)}"
                return None
        return self._meteor

    def meteor_failed(self, e: BaseException) -> None:
        """Record that METEOR failed mid-run (its values become null)."""
        self.reasons["METEOR"] = f"meteor-1.5.jar failed: {type(e).__name__}: {_one_line(e)}"
        self.close()

    def close(self) -> None:
        """Stop the METEOR Java process, if one runs."""
        if self._meteor is not None:
            proc = self._meteor.meteor_p
            proc.kill()
            proc.wait()
            self._meteor = None


# ---------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class _Context:
    iou: Callable[[Sequence, Sequence], np.ndarray]
    similarity: _LazySimilarity
    tools: CaptionTools
    rng: random.Random
    invalid: dict[str, Counter] = field(default_factory=dict)
    fallback: dict[str, int] = field(default_factory=dict)

    def bad(self, task: str, reason: str) -> None:
        self.invalid.setdefault(task, Counter())[reason] += 1


def _answer(sample: dict, ctx: _Context) -> str | None:
    """The answer text, or None after counting why there is none (missing, not a string, empty)."""
    if "a" not in sample:
        ctx.bad(sample["task"], MISSING_PREDICTION if sample.get("_no_prediction") else MISSING_ANSWER)
        return None
    if not isinstance(sample["a"], str):
        ctx.bad(sample["task"], NOT_A_STRING)
        return None
    if not sample["a"].strip():
        ctx.bad(sample["task"], EMPTY_ANSWER)
    return sample["a"]


def _spans(sample: dict, ctx: _Context) -> list[list[float]] | None:
    answer = _answer(sample, ctx)
    if answer is None:
        return None
    spans, reason = read_spans(answer)
    if spans is None and answer.strip():
        ctx.bad(sample["task"], reason)
    return spans


def _past_end(span: Sequence[float], sample: dict) -> bool:
    return span[0] >= sample["duration"]


def _one_span_iou(sample: dict, ctx: _Context, gt: list) -> float | None:
    """IoU of the answer's first span with the best of ``gt`` (None: unread answer, counted failed); a first span
    starting at or past the video's end scores 0."""
    spans = _spans(sample, ctx)
    if spans is None:
        return None
    if _past_end(spans[0], sample):
        ctx.bad(sample["task"], PAST_END)
        return 0.0
    return float(ctx.iou(gt, [spans[0]]).max())


def _recall_block(ious: list[float], total: int, prefix: str) -> tuple[dict, float]:
    """``{prefix}@t`` = (IoUs >= t) / total, rounded, and their unrounded mean (e.g. :436-446)."""
    hits = [sum(iou >= t for iou in ious) / total for t in IOU_THRESHOLDS]
    out = {f"{prefix}@{t}": round(h, 5) for h, t in zip(hits, IOU_THRESHOLDS)}
    return out, sum(hits) / len(hits)


def _first_span_recall(samples: list[dict], ctx: _Context, ground_truth: Callable[[dict], list], prefix: str,
                       mean_key: str) -> dict:
    """``{"Total", "Failed", "mIoU", "<prefix>@t"..., mean_key}`` of the answers' first spans, each against its
    best ground-truth span (``ground_truth(sample)``), failed samples counting as misses (tvg and tem alike)."""
    ious, failed = [], 0
    for sample in samples:
        iou = _one_span_iou(sample, ctx, ground_truth(sample))
        if iou is None:
            failed += 1
            continue
        ious.append(iou)
    n = len(samples)
    out = {"Total": n, "Failed": failed, "mIoU": round(sum(ious) / n, 5)}
    block, mean = _recall_block(ious, n, prefix)
    out.update(block)
    out[mean_key] = round(mean, 5)
    return out


def score_grounding(samples: list[dict], ctx: _Context) -> dict:
    """tvg and epm (``tvg_eval``, ETBench evaluation/compute_metrics.py:418-447).

    The first span of each answer against the one ground-truth span ``tgt``. ``F1@t`` = (samples with IoU >= t) /
    Total (failed samples count as misses), ``F1`` = mean over t, ``mIoU`` = sum of IoU / Total. The IoU is a float32
    value compared as a Python float (upstream's ``.item()``, :433), so an IoU of 7/10 (0.69999999) misses 0.7.

    Args:
        samples: one task and source's records (all with ``tgt`` ``[s, e]`` in seconds and ``duration``).

    Returns:
        ``{"Total", "Failed", "mIoU", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1"}``.
    """
    return _first_span_recall(samples, ctx, lambda sample: [sample["tgt"]], "F1", "F1")


def score_tem(samples: list[dict], ctx: _Context) -> dict:
    """tem (``tem_eval``, ETBench evaluation/compute_metrics.py:477-506): the first span's best IoU over the
    ground-truth spans; ``R@t``, ``mRec`` (mean of R@t), ``mIoU``, failed samples counting as misses.

    Args:
        samples: one source's records (``tgt`` a list of ``[s, e]`` seconds, ``duration``).

    Returns:
        ``{"Total", "Failed", "mIoU", "R@0.1", "R@0.3", "R@0.5", "R@0.7", "mRec"}``.
    """
    return _first_span_recall(samples, ctx, lambda sample: sample["tgt"], "R", "mRec")


def score_tal(samples: list[dict], ctx: _Context) -> dict:
    """tal (``tal_eval``, ETBench evaluation/compute_metrics.py:509-539).

    Per sample and threshold t, with the IoU matrix of ground truths x answered spans: 0 when no IoU reaches t, else
    recall = share of ground truths whose best IoU >= t, precision = share of answered spans whose best IoU >= t
    (float32 means; the comparisons are float32 tensor ops, so an IoU of 7/10 does reach 0.7 here, unlike tvg),
    F1 = 2PR / (P + R). ``F1@t`` = sum over samples / Total, ``F1`` = mean over t. Duplicated
    answer spans each count as a hit (no one-to-one matching). Spans past the video's end stay, as misses.

    Returns:
        ``{"Total", "Failed", "F1@0.1", "F1@0.3", "F1@0.5", "F1@0.7", "F1"}``.
    """
    sums = [0.0 for _ in IOU_THRESHOLDS]
    failed = 0
    for sample in samples:
        spans = _spans(sample, ctx)
        if spans is None:
            failed += 1
            continue
        if any(_past_end(s, sample) for s in spans):
            ctx.bad(sample["task"], PAST_END)
        iou = ctx.iou(sample["tgt"], spans)
        for i, t in enumerate(IOU_THRESHOLDS):
            if iou.max() < t:
                continue
            rec = float((iou.max(axis=1) >= t).astype(np.float32).mean())
            prc = float((iou.max(axis=0) >= t).astype(np.float32).mean())
            sums[i] += 2 * prc * rec / (prc + rec)
    n = len(samples)
    f1 = [s / n for s in sums]
    out = {"Total": n, "Failed": failed}
    out.update({f"F1@{t}": round(v, 5) for v, t in zip(f1, IOU_THRESHOLDS)})
    out["F1"] = round(sum(f1) / len(f1), 5)
    return out


def _second_map(spans: Iterable[Sequence[float]], value: int) -> np.ndarray:
    grid = np.zeros(EVS_SECONDS, dtype=np.int64)
    for s, e in spans:
        grid[max(0, round(s)) : round(e)] = value  # Python round: half to even, as upstream (:556-566)
    return grid


def score_evs(samples: list[dict], ctx: _Context) -> dict:
    """evs (``evs_eval``, ETBench evaluation/compute_metrics.py:542-588): per-second F1.

    Each span ``[s, e]`` marks seconds ``max(0, round(s)) .. round(e) - 1`` (Python's half-to-even ``round``) of a
    1000-second grid, so anything past 1000 s is cut and ``[2.5, 3.5]`` marks second 2 only. TP/FP/FN count seconds
    of the union of answered spans against the union of ground-truth spans; F1 is 0 when TP = 0. ``F1`` is the mean
    over the samples whose answer was read: unread answers are only counted in ``Failed`` and do not lower it
    (upstream's quirk); 0 when none was read.

    Returns:
        ``{"Total", "Failed", "F1"}``.
    """
    f1s, failed = [], 0
    for sample in samples:
        spans = _spans(sample, ctx)
        if spans is None:
            failed += 1
            continue
        if any(_past_end(s, sample) for s in spans):
            ctx.bad(sample["task"], PAST_END)
        both = _second_map(sample["tgt"], 1) + _second_map(spans, 2)
        tp, fp, fn = int((both == 3).sum()), int((both == 2).sum()), int((both == 1).sum())
        if tp == 0:
            f1s.append(0)
            continue
        rec, prc = tp / (tp + fn), tp / (tp + fp)
        f1s.append(2 * prc * rec / (prc + rec))
    return {"Total": len(samples), "Failed": failed, "F1": round(sum(f1s) / len(f1s), 5) if f1s else 0}


def score_vhd(samples: list[dict], ctx: _Context) -> dict:
    """vhd (``vhd_eval``, ETBench evaluation/compute_metrics.py:450-474): hit rate named ``F1``.

    The answer's first number (seconds) hits when ``g0 <= t <= g1`` for any span of any annotator (``tgt`` is one
    annotator's spans or a list of them, :454-455). ``F1`` = hits / Total. A number past the video's end misses.

    Returns:
        ``{"Total", "Failed", "F1"}``.
    """
    hits, failed = 0, 0
    for sample in samples:
        answer = _answer(sample, ctx)
        point = None if answer is None else read_point(answer)
        if point is None:
            failed += 1
            if answer is not None and answer.strip():
                ctx.bad(sample["task"], NO_TIMESTAMP)
            continue
        if point > sample["duration"]:
            ctx.bad(sample["task"], PAST_END)
            continue
        gt = sample["tgt"]
        annotators = gt if isinstance(gt[0][0], (list, tuple)) else [gt]
        hits += any(g[0] <= point <= g[1] for annotator in annotators for g in annotator)
    return {"Total": len(samples), "Failed": failed, "F1": round(hits / len(samples), 5)}


def _option_text(option: Any, letter: str) -> str:
    text = f"{option[0]} - {option[1]}" if isinstance(option, (list, tuple)) else option
    return f"({letter}) {text}"  # :633-637


def _by_similarity(text: str, options: list, ctx: _Context, key: str) -> int | None:
    """The option most similar to ``text`` (first of ties, :630-641); None when no model (counted per task/source)."""
    model, _ = ctx.similarity.get()
    if model is None:
        ctx.fallback[key] = ctx.fallback.get(key, 0) + 1
        return None
    best, best_score = 0, float("-inf")
    for i, option in enumerate(options):
        sim = model.similarity(text, _option_text(option, string.ascii_uppercase[i]))
        if sim > best_score:
            best, best_score = i, sim
    return best


def score_choice(samples: list[dict], ctx: _Context) -> dict:
    """rar, eca and rvq (``rvq_eval``, ETBench evaluation/compute_metrics.py:591-652; eca too, :854).

    The letter is read by :func:`read_choice` with the option count of the source's FIRST sample (upstream's quirk,
    :592-597; upstream supports only 4 or 5 and raises otherwise, here any count works). Answers without a usable
    letter go to upstream's similarity fallback (the option whose ``"(L) text"`` is most similar to the answer by
    all-MiniLM-L6-v2); without that model they score as wrong and ``not_computed`` says how many. ``Failed`` counts
    empty answers and answers with no letter-like start at all.

    Returns:
        ``{"Total", "Failed", "Acc"}``.
    """
    n_options = len(samples[0]["o"])
    hits, failed = 0, 0
    for sample in samples:
        answer = _answer(sample, ctx)
        if answer is None:
            failed += 1
            continue
        choice = read_choice(answer, n_options)
        failed += choice.failed
        if choice.reason is not None and choice.reason != EMPTY_ANSWER:
            ctx.bad(sample["task"], choice.reason)
        index = choice.index
        if index is None and choice.fallback is not None:
            index = _by_similarity(choice.fallback, sample["o"], ctx, f"{sample['task']}/{sample['source']}")
        hits += index == sample["p"]
    return {"Total": len(samples), "Failed": failed, "Acc": round(hits / len(samples), 5)}


def score_gvq(samples: list[dict], ctx: _Context) -> dict:
    """gvq (``gvq_eval``, ETBench evaluation/compute_metrics.py:655-735).

    ``Acc``: the option read by :func:`read_gvq_choice` (with the similarity fallback as in :func:`score_choice`).
    Then only on samples whose option was right, the first span of the whole answer against ``tgt`` ``[s, e]``:
    ``R@t`` = (right option and IoU >= t) / Total, ``mRec`` = mean over t, ``mIoU`` = sum of IoU / Total. ``Failed``
    = empty answers + right-option answers without a timestamp.

    Returns:
        ``{"Total", "Failed", "mIoU", "R@0.1", "R@0.3", "R@0.5", "R@0.7", "mRec", "Acc"}``.
    """
    right, failed, ious = 0, 0, []
    for sample in samples:
        answer = _answer(sample, ctx)
        if answer is None:
            failed += 1
            continue
        choice = read_gvq_choice(answer, len(sample["o"]))
        failed += choice.failed
        if choice.reason is not None and choice.reason != EMPTY_ANSWER:
            ctx.bad(sample["task"], choice.reason)
        index = choice.index
        if index is None and choice.fallback is not None:
            index = _by_similarity(choice.fallback, sample["o"], ctx, f"{sample['task']}/{sample['source']}")
        if index != sample["p"]:
            continue
        right += 1
        iou = _one_span_iou(sample, ctx, [sample["tgt"]])
        if iou is None:
            failed += 1
            continue
        ious.append(iou)
    n = len(samples)
    out = {"Total": n, "Failed": failed, "mIoU": round(sum(ious) / n, 5)}
    block, mean = _recall_block(ious, n, "R")
    out.update(block)
    out["mRec"] = round(mean, 5)
    out["Acc"] = round(right / n, 5)
    return out


def _remove_nonascii(text: str) -> str:
    return "".join(c if ord(c) < 128 else " " for c in text)  # :61-62


def _caption_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """DVCEval.iou (ETBench evaluation/compute_metrics.py:84-90), float64, with its 1e-8 and min() union."""
    inter = max(0, min(b[1], a[1]) - max(b[0], a[0]))
    union = min(max(b[1], a[1]) - min(b[0], a[0]), b[1] - b[0] + a[1] - a[0])
    return float(inter) / (union + 1e-8)


def _detection(videos: dict, t: float) -> tuple[float, float]:
    """DVCEval.evaluate_detection (:113-140): mean over videos of (covered answers / answers, covered refs / refs),
    a pair covering when IoU > t (strictly)."""
    precisions, recalls = [], []
    for preds, (refs, _) in videos.values():
        pred_hit, ref_hit = set(), set()
        for i, (span, _) in enumerate(preds):
            for j, ref in enumerate(refs):
                if _caption_iou(span, ref) > t:
                    pred_hit.add(i)
                    ref_hit.add(j)
        precisions.append(len(pred_hit) / len(preds))
        recalls.append(len(ref_hit) / len(refs))
    return sum(precisions) / len(precisions), sum(recalls) / len(recalls)


def _random_reference(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(10, 20)))  # :56-58, :173


def _caption_scores(videos: dict, ctx: _Context) -> dict[str, float | None]:
    """DVCEval.evaluate_tiou (:142-209) at every threshold, averaged over thresholds (:775-776)."""
    tools = ctx.tools
    # Pairs per threshold and video: each answer with every reference of IoU >= t, or with a random string.
    texts: dict[Any, str] = {}
    pairs: dict[float, dict[Any, list[tuple[Any, Any]]]] = {}
    for ti, t in enumerate(IOU_THRESHOLDS):
        pairs[t] = {}
        for v, (preds, (refs, ref_caps)) in videos.items():
            rows = pairs[t][v] = []
            for i, (span, sentence) in enumerate(preds):
                texts[("p", v, i)] = _remove_nonascii(sentence)
                matched = False
                for j, ref in enumerate(refs):
                    if _caption_iou(span, ref) >= t:
                        texts[("g", v, j)] = _remove_nonascii(ref_caps[j])
                        rows.append((("p", v, i), ("g", v, j)))
                        matched = True
                if not matched:
                    key = ("r", ti, v, i)
                    texts[key] = _random_reference(ctx.rng)
                    rows.append((("p", v, i), key))
    names = [k for k in CAPTION_METRICS if k not in tools.reasons]
    similarity = None
    if "SentSim" in names:
        similarity, why = ctx.similarity.get()
        if similarity is None:
            tools.reasons["SentSim"] = f"needs {SENTSIM_MODEL}: {why}"
            names.remove("SentSim")
    tokens = tools.tokenize(texts) if names else None
    if tokens is None:
        return {k: None for k in CAPTION_METRICS}

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    per_t: dict[str, list[float]] = {k: [] for k in CAPTION_METRICS}
    for t in IOU_THRESHOLDS:
        per_video: dict[str, list[float]] = {k: [] for k in CAPTION_METRICS}
        for rows in pairs[t].values():
            res = {n: [tokens[p]] for n, (p, _) in enumerate(rows)}
            gts = {n: [tokens[g]] for n, (_, g) in enumerate(rows)}
            bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
            for k, b in zip(CAPTION_METRICS[:4], bleu):
                per_video[k].append(b)
            per_video["ROUGE_L"].append(Rouge().compute_score(gts, res)[0])
            per_video["CIDEr"].append(Cider().compute_score(gts, res)[0])
            meteor = tools.meteor()
            if meteor is not None:
                try:
                    per_video["METEOR"].append(meteor.compute_score(gts, res)[0])
                except Exception as e:  # noqa: BLE001
                    tools.meteor_failed(e)
            if similarity is not None:
                per_video["SentSim"].append(
                    similarity.paired_mean([g[0] for g in gts.values()], [r[0] for r in res.values()])
                )
        for k in CAPTION_METRICS:
            per_t[k].append(float(np.mean(per_video[k])) if per_video[k] else math.nan)
    return {k: None if k in tools.reasons or k not in names else sum(v) / len(v) for k, v in per_t.items()}


def score_captioning(samples: list[dict], ctx: _Context) -> dict:
    """dvc and slc (``dvc_eval`` and ``DVCEval``, ETBench evaluation/compute_metrics.py:63-209, :738-777).

    Answers are read by :func:`read_captions`. The ground truth and answer are keyed by ``video``: two samples of
    one source with the same video keep only the last (upstream's dedup quirk, :751-752), and ``scale`` = (distinct
    videos with a read answer) / Total. At each t: precision and recall of the videos' answers (a span covers at
    IoU > t, :130) times ``scale`` give ``F1@t``; ``F1`` is their mean. Text metrics pair each answered caption with
    every reference caption of IoU >= t (:161), or with a random 10-20 letter string when none (:173; upstream's
    ``random`` is unseeded, here a seeded ``random.Random``), PTB-tokenize them, score each video with pycocoevalcap's
    BLEU-1..4, METEOR, ROUGE-L, CIDEr and the SentSim model, and average over the videos with a read answer (not
    scaled), then over t. Each video's answer list is cut to 1000 spans (:67). With no read answer at all every
    metric is 0 (:760-764).

    Returns:
        ``{"Total", "Failed", "F1@0.1", ..., "F1@0.7", "F1", "Bleu_1", ..., "Bleu_4", "METEOR", "ROUGE_L", "CIDEr",
        "SentSim"}``; a text metric that cannot be computed is None.
    """
    videos: dict[str, tuple[list, tuple[list, list]]] = {}
    failed = 0
    for sample in samples:
        answer = _answer(sample, ctx)
        spans, sentences = (None, None) if answer is None else read_captions(answer)
        if spans is None:
            failed += 1
            if answer is not None and answer.strip():
                ctx.bad(sample["task"], NO_TIMESTAMP)
            continue
        if any(_past_end(s, sample) for s in spans):
            ctx.bad(sample["task"], PAST_END)
        preds = list(zip(spans, sentences))[:MAX_PROPOSALS]
        videos[sample["video"]] = (preds, (sample["tgt"], sample["g"]))
    scale = len(videos) / len(samples)
    out: dict[str, Any] = {"Total": len(samples), "Failed": failed}
    if not videos:
        out.update({f"F1@{t}": 0 for t in IOU_THRESHOLDS})
        out["F1"] = 0
        out.update({k: 0 for k in CAPTION_METRICS})
        return out
    f1s = []
    for t in IOU_THRESHOLDS:
        prc, rec = _detection(videos, t)
        prc, rec = prc * scale, rec * scale
        f1 = 0 if prc + rec == 0 else 2 * prc * rec / (prc + rec)
        out[f"F1@{t}"] = round(f1, 5)
        f1s.append(f1)
    out["F1"] = round(sum(f1s) / len(f1s), 5)
    for k, v in _caption_scores(videos, ctx).items():
        out[k] = None if v is None else round(v, 5)
    return out


TASK_SCORERS: dict[str, Callable[[list[dict], _Context], dict]] = {
    "tvg": score_grounding,
    "epm": score_grounding,
    "vhd": score_vhd,
    "tem": score_tem,
    "tal": score_tal,
    "evs": score_evs,
    "dvc": score_captioning,
    "slc": score_captioning,
    "rar": score_choice,
    "rvq": score_choice,
    "eca": score_choice,
    "gvq": score_gvq,
}  # the dispatch of ETBench evaluation/compute_metrics.py:842-859


# ---------------------------------------------------------------------------------------------------------------
# Records


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_span(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) == 2 and all(map(_is_number, x)) and x[0] <= x[1]


def _is_span_list(x: Any) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(map(_is_span, x))


def check_record(record: Any) -> list[tuple[str, str]]:
    """The problems of one annotation record, as ``(field, error)`` pairs; empty when it can be scored.

    Checks what the task's scorer reads (docs/BENCHMARK.md's fields): ``idx``, ``task`` (one of the 12),
    ``source``, ``duration`` (> 0 s) always; ``tgt`` (``[s, e]`` for tvg/epm/gvq, a non-empty list of them for
    tem/tal/evs/dvc/slc, that or a list of such lists per annotator for vhd; s <= e, seconds); ``o`` (a non-empty
    list of at most 26 options) and ``p`` (an index into ``o``) for rar/eca/rvq/gvq; ``video`` (a string) and ``g``
    (one string per ``tgt`` span) for dvc/slc. The answer ``a`` is not checked here.
    """
    if not isinstance(record, dict):
        return [("", "not a JSON object")]
    problems = []
    for key in ("idx", "task", "source", "duration"):
        if key not in record:
            problems.append((key, "missing"))
    task = record.get("task")
    if "task" in record and task not in TASKS:
        problems.append(("task", f"unknown task {task!r}"))
    if "idx" in record and not isinstance(record["idx"], (int, str)):
        problems.append(("idx", "not an integer or string"))
    if "source" in record and not isinstance(record["source"], str):
        problems.append(("source", "not a string"))
    if "duration" in record and not (_is_number(record["duration"]) and record["duration"] > 0):
        problems.append(("duration", "not a positive number of seconds"))
    if task not in TASKS:
        return problems
    needed = ["tgt"] if task not in ("rar", "eca", "rvq") else []
    if task in _CHOICE_TASKS:
        needed += ["o", "p"]
    if task in _CAPTION_TASKS:
        needed += ["video", "g"]
    for key in needed:
        if key not in record:
            problems.append((key, "missing"))
    tgt = record.get("tgt")
    if "tgt" in needed and "tgt" in record:
        if task in _SPAN_TASKS:
            ok = _is_span(tgt)
        elif task == "vhd":
            ok = _is_span_list(tgt) or (isinstance(tgt, list) and len(tgt) > 0 and all(map(_is_span_list, tgt)))
        else:
            ok = _is_span_list(tgt)
        if not ok:
            problems.append(("tgt", "not the task's [start, end] span(s) in seconds"))
    if task in _CHOICE_TASKS and "o" in record:
        options = record["o"]
        if not (isinstance(options, list) and 0 < len(options) <= 26):
            problems.append(("o", "not a list of 1 to 26 options"))
        elif "p" in record and not (
            isinstance(record["p"], int) and not isinstance(record["p"], bool) and 0 <= record["p"] < len(options)
        ):
            problems.append(("p", "not an index into o"))
    if task in _CAPTION_TASKS:
        if "video" in record and not isinstance(record["video"], str):
            problems.append(("video", "not a string"))
        g = record.get("g")
        if "g" in record and not (
            isinstance(g, list)
            and all(isinstance(c, str) for c in g)
            and (not _is_span_list(tgt) or len(g) == len(tgt))
        ):
            problems.append(("g", "not one caption string per tgt span"))
    return problems


def load_records(path: str | Path) -> list[Any]:
    """The records of an E.T. Bench JSON file (a list), a JSON Lines file (``.jsonl``, one record a line), or a
    folder of such files (read in name order, skipping names containing ``metrics`` as ETBench
    evaluation/compute_metrics.py:796-798 does).

    Returns:
        a list of ``(file, index, record)`` tuples (``index`` is the record's 0-based position in its file).

    Raises:
        InputError: the path is missing or unreadable, not JSON, or not a list of records.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and "metrics" not in p.name)
        if not files:
            raise InputError(path, "folder holds no .json or .jsonl file")
        return [item for f in files for item in load_records(f)]
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot be read: {type(e).__name__}: {_one_line(e)}") from None
    try:
        if path.suffix == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e}") from None
    if not isinstance(data, list):
        raise InputError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return [(str(path), i, record) for i, record in enumerate(data)]


def load_subset(path: str | Path) -> dict[str, dict[str, set]]:
    """A subset file like E.T. Bench's ``evaluation/subset.json``: ``{task: {source: [idx, ...]}}`` (ETBench
    evaluation/compute_metrics.py:813-826; the 470-sample subset of its paper's Table 1, docs/BENCHMARK.md).

    Raises:
        InputError: unreadable, not JSON, or not that shape.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot be read: {type(e).__name__}: {_one_line(e)}") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e}") from None
    if not isinstance(data, dict) or not all(
        isinstance(s, dict) and all(isinstance(ids, list) for ids in s.values()) for s in data.values()
    ):
        raise InputError(path, "expected {task: {source: [idx, ...]}}")
    return {task: {source: set(_hashable(i) for i in ids) for source, ids in s.items()} for task, s in data.items()}


def _hashable(x: Any) -> Any:
    return json.dumps(x, sort_keys=True) if isinstance(x, (list, dict)) else x


def _key(record: dict) -> tuple:
    return record["task"], record["source"], _hashable(record["idx"])


def _prepare(
    predictions: list, annotations: list | None, subset: dict | None
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Valid records to score (with ``a`` from the predictions), the skipped ones, and input counts."""
    skipped: list[dict] = []
    inputs: dict[str, int] = {"predictions": len(predictions)}

    def valid(items: list, full: bool) -> list[dict]:
        keep, seen = [], set()
        for file, i, record in items:
            problems = check_record(record) if full else _key_problems(record)
            if not problems and _key(record) in seen:
                problems = [("idx", "duplicate (task, source, idx): only the first record is used")]
            if problems:
                skipped.extend({"file": file, "index": i, "field": f, "error": e} for f, e in problems)
                continue
            seen.add(_key(record))
            keep.append(record)
        return keep

    if annotations is None:
        records = valid(predictions, True)
    else:
        inputs["annotations"] = len(annotations)
        answers = {_key(r): r for r in valid(predictions, False)}
        records = []
        for record in valid(annotations, True):
            merged = {k: v for k, v in record.items() if k != "a"}
            prediction = answers.pop(_key(record), None)
            if prediction is None:
                merged["_no_prediction"] = True
            elif "a" in prediction:
                merged["a"] = prediction["a"]
            records.append(merged)
        inputs["predictions_not_in_annotations"] = len(answers)
    if subset is not None:
        records = [r for r in records if _hashable(r["idx"]) in subset.get(r["task"], {}).get(r["source"], ())]
    inputs["scored"] = len(records)
    return records, skipped, inputs


def _key_problems(record: Any) -> list[tuple[str, str]]:
    if not isinstance(record, dict):
        return [("", "not a JSON object")]
    problems = [(k, "missing") for k in ("idx", "task", "source") if k not in record]
    if "idx" in record and not isinstance(record["idx"], (int, str)):
        problems.append(("idx", "not an integer or string"))
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Aggregation


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else round(sum(values) / len(values), 5)


def aggregate(collected: dict[str, dict[str, dict]]) -> dict[str, Any]:
    """The numbers compute_metrics.py logs beside ``metrics.json`` (ETBench evaluation/compute_metrics.py:868-972).

    Args:
        collected: ``{task: {source: metrics}}`` as :func:`evaluate` returns under ``metrics``.

    Returns:
        ``{"tasks", "groups", "overall", "merged", "missing"}``: ``tasks[task]`` is the mean over its sources of its
        headline metric (``Acc``; ``F1``; ``F1`` and ``SentSim``; ``mRec``), rounded to 5 decimals (:884, :906,
        :930-931, :951); ``groups`` the per-group means over all sources the log prints (``Mean Acc``, ``Mean F1``,
        ``Mean SentSim``, ``TEM Mean Rec``, ``GVQ Mean Rec``); ``overall`` the "Overall" table (percent, 1 decimal,
        :956-959) for the tasks present; ``merged`` the "Merged" table (percent, 1 decimal, :962-972) for columns
        whose tasks are all present; ``missing`` the merged columns left out and why. Upstream fills these tables
        by position and breaks (or mislabels) when a task is absent; here each is keyed by name. A value that
        depends on a metric that could not be computed is None.
    """
    headline = {"Referring": ("Acc",), "Grounding": ("F1",), "Captioning": ("F1", "SentSim"), "Complex": ("mRec",)}
    tasks: dict[str, dict] = {}
    groups: dict[str, dict] = {}
    for group, names in GROUPS.items():
        present = [t for t in names if t in collected]
        if not present:
            continue
        for task in present:
            tasks[task] = {m: _mean([d[m] for d in collected[task].values()]) for m in headline[group]}
        rows = [d for t in present for d in collected[t].values()]
        if group == "Complex":
            groups[group] = {f"{t.upper()} Mean Rec": tasks[t]["mRec"] for t in present}  # :953-954
        else:
            label = {"Acc": "Mean Acc", "F1": "Mean F1", "SentSim": "Mean SentSim"}
            groups[group] = {label[m]: _mean([d[m] for d in rows]) for m in headline[group]}  # :886, :908, :933-934
    overall = {}
    for label, task, metric in OVERALL:
        if task in tasks:
            value = tasks[task][metric]
            overall[label] = None if value is None else round(value * 100, 1)
    merged, missing = {}, {}
    for label, columns in MERGED.items():
        absent = [c for c in columns if c not in overall]
        if absent:
            missing[label] = f"needs {', '.join(absent)}"
            continue
        values = [tasks[t][m] for lab, t, m in OVERALL if lab in columns]
        merged[label] = None if any(v is None for v in values) else round(sum(values) * 100 / len(values), 1)
    return {"tasks": tasks, "groups": groups, "overall": overall, "merged": merged, "missing": missing}


def evaluate(
    records: list[dict],
    *,
    similarity: Similarity | None | str = "auto",
    similarity_model: str = SENTSIM_MODEL,
    allow_download: bool = False,
    device: str | None = None,
    java: bool = True,
    iou: str = "auto",
    seed: int = 0,
) -> dict[str, Any]:
    """Score valid E.T. Bench records (see :func:`check_record`) whose ``a`` holds the model's answer.

    Records are grouped by task, then source, in the order they first appear (ETBench
    evaluation/compute_metrics.py:816-827), and each group is scored by its task's scorer (:839-864). Should a
    scorer still raise on some input, that task/source is left out of ``metrics`` and named in ``not_computed``.

    Args:
        records: the records; ``a`` may be missing or malformed (counted under ``invalid``, scored as wrong).
        similarity: a :class:`Similarity`, None (off), or ``"auto"`` (load ``similarity_model`` when first needed).
        similarity_model: model id or folder for ``"auto"``.
        allow_download: let ``"auto"`` ask the Hugging Face hub.
        device: torch device for the similarity model.
        java: use Java when ``java`` is on PATH (pycocoevalcap runs it from there); False treats it as absent.
        iou: ``"auto"``, ``"nncore"`` or ``"numpy"`` (see :func:`iou_backend`).
        seed: seed of the random reference strings of unmatched captions.

    Returns:
        ``{"benchmark": "etbench", "metrics": {task: {source: {...}}} (compute_metrics.py's metrics.json),
        "tasks", "groups", "overall", "merged", "merged_missing" (see :func:`aggregate`; ``missing`` there), "invalid":
        {task: {reason: count}}, "not_computed": {metric: reason}, "backends": {...}}``.

    Raises:
        ValueError: an unknown ``iou`` backend.
    """
    iou_name, _ = iou_backend(iou)
    tools = CaptionTools(java=java)
    ctx = _Context(
        iou=lambda a, b: temporal_iou(a, b, iou),
        similarity=_LazySimilarity(similarity, similarity_model, allow_download, device),
        tools=tools,
        rng=random.Random(seed),
    )
    groups: dict[str, dict[str, list[dict]]] = {}
    for record in records:
        groups.setdefault(record["task"], {}).setdefault(record["source"], []).append(record)
    collected: dict[str, dict[str, dict]] = {}
    not_computed: dict[str, str] = {}
    try:
        for task, sources in groups.items():
            for source, samples in sources.items():
                try:
                    collected.setdefault(task, {})[source] = TASK_SCORERS[task](samples, ctx)
                except Exception as e:  # noqa: BLE001 - a scorer bug must not lose every other task's numbers
                    not_computed[f"{task}/{source}"] = f"scorer failed: {type(e).__name__}: {_one_line(e)}"
            if not collected.get(task):
                collected.pop(task, None)
    finally:
        tools.close()
    for k in CAPTION_METRICS:
        if any(d[k] is None for t in _CAPTION_TASKS for d in collected.get(t, {}).values()):
            not_computed[k] = tools.reasons.get(k, "not computed")
    if ctx.fallback:
        _, why = ctx.similarity.get()
        counts = ", ".join(f"{k}: {n}" for k, n in sorted(ctx.fallback.items()))
        not_computed["option similarity fallback"] = (
            f"answers without a usable option letter ({counts}) are matched to an option by {SENTSIM_MODEL} "
            f"similarity upstream; {why}; they are scored as wrong, so those Acc values are lower bounds"
        )
    summary = aggregate(collected)
    summary["merged_missing"] = summary.pop("missing")
    similarity_value, _ = ctx.similarity.get() if ctx.similarity.loaded else (None, None)
    return {
        "benchmark": "etbench",
        "upstream": UPSTREAM,
        "metrics": collected,
        **summary,
        "invalid": {task: dict(sorted(c.items())) for task, c in ctx.invalid.items()},
        "not_computed": not_computed,
        "backends": {
            "temporal_iou": iou_name,
            "sentence_similarity": type(similarity_value).__name__ if similarity_value is not None else None,
            "java": shutil.which("java") if java else None,
        },
    }


def score_files(
    predictions: str | Path,
    annotations: str | Path | None = None,
    subset: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score an E.T. Bench prediction file (the annotation list with ``a`` added; a folder of such files works).

    With ``annotations`` the ground truth comes from that file and each record's answer from the prediction with the
    same ``(task, source, idx)``; an annotation without one scores as wrong (``missing prediction``). Without it the
    predictions' own fields are the ground truth, as compute_metrics.py reads them (ETBench
    evaluation/compute_metrics.py:806-809).

    Args:
        predictions: the prediction file or folder.
        annotations: ``etbench_txt_v1.0.json`` / ``etbench_vid_v1.0.json`` or a part of it.
        subset: a ``subset.json`` (:func:`load_subset`) to score only its samples (compute_metrics.py ``--subset``).
        options: passed to :func:`evaluate`.

    Returns:
        :func:`evaluate`'s result plus ``"skipped"`` (malformed records: ``{"file", "index", "field", "error"}``,
        not scored) and ``"inputs"`` (record counts).

    Raises:
        InputError: an input file is unreadable or not a list of records (or, for ``subset``, not its shape).
    """
    preds = load_records(predictions)
    annos = load_records(annotations) if annotations is not None else None
    chosen = load_subset(subset) if subset is not None else None
    records, skipped, inputs = _prepare(preds, annos, chosen)
    result = evaluate(records, **options)
    result["skipped"] = skipped
    result["inputs"] = inputs
    return result
