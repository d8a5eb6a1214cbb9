"""Multiple-choice video benchmarks scored as lmms-eval and VideoChat-Flash's lmms-eval fork score them.

Sources. ``VCF <path>:N`` is line N of OpenGVLab/VideoChat-Flash ``lmms-eval_videochat/<path>`` (commit 2f8e2f57,
2025-11-18), its own fork of lmms-eval, the ``videochat_flash`` variant; ``LE <path>:N`` is line N of
EvolvingLMMs-Lab/lmms-eval ``<path>`` (commit 75571cfe, 2026-08-06), the ``lmms_eval`` variant. Both run the
benchmarks greedy with ``max_new_tokens: 16`` (e.g. VCF lmms_eval/tasks/mvbench/_default_template.yaml:6-11; 32 for
LongVideoBench, VCF lmms_eval/tasks/longvideobench/longvideobench_val_v.yaml:15-18), under ``--model videochat_flash``
(VCF scripts/eval_mvbench.sh:2), so each task's ``default`` prompt kwargs apply.

Prompts are VideoChat-Flash's (the ``prompt`` of an item); the letter parsing and the aggregation follow the variant
asked for in :func:`score`:

- ``mvbench``: VCF tasks/mvbench/utils.py:108-121, post prompt ``"\\nOnly give the best option."``
  (mvbench_action_antonym.yaml:8; LE has ``"Question:"`` without the space and ``"Only give the best option.\\n"``).
  Parsing ``mcq_acc`` (:125-174) in both variants; the answer text becomes the letter of the first equal candidate
  (:187-193). Quirk: the aggregate leaves predictions that are exactly ``""`` out of the denominator (:213-220),
  counted here under ``excluded_empty``. Overall pools the 20 subtasks (group yaml mvbench.yaml has no weights).
- ``videomme``: prompt VCF tasks/videomme/utils.py:195-206 with videomme.yaml's post prompt. Parsing:
  videochat_flash ``extract_characters_regex`` (VCF :282-301: strip a few prefixes, the first of ``[ABCD]``
  anywhere; its list glues ``"The best option is" "The correct option is"`` into one string, so ``"Best option: C"``
  reads as ``B``); lmms_eval ``extract_mcq_answer`` (LE lmms_eval/tasks/_task_utils/mcq_extract.py:66-158 via
  LE tasks/videomme/utils.py:256-259). Percent, per ``duration`` (short/medium/long) and ``task_type``
  (VCF :334-403).
- ``perceptiontest`` (mc, val): VCF tasks/perceptiontest/val/utils.py:48-71 (``"(A). "`` options,
  ``"\\nOnly give the best option."``), parsing ``\\b([A-D])\\b`` (:110-126, the same in LE), accuracy a
  **fraction** (:139-149).
- ``longvideobench`` (``lvb_val.json``): options ``"(A). text"`` (VCF tasks/longvideobench/utils.py:127); the VCF
  task interleaves subtitles (:131-154) which needs the subtitle files, so the prompt here is the task's
  no-subtitle form (:157) with the yaml post prompt. Parsing: videochat_flash the MMMU-style
  ``parse_multi_choice_response`` (:214-272, including matching option text in answers over 5 words); lmms_eval the
  ``[ABCDE]`` search (LE tasks/longvideobench/utils.py:187-213). Upstream draws a **random** letter when nothing
  parses (:249-250, LE :208, :212); here such answers are wrong and counted under ``invalid``. Accuracy a fraction
  rounded to 5 decimals, per ``duration_group`` and ``question_category`` (:344-367).
- ``mlvu`` (multiple choice, dev): VCF's layout (``json/<n>_<task>.json`` of ``{video, question, candidates, answer
  text, question_type}``, VCF tasks/mlvu_mc/utils.py:96-108, post prompt ``"Answer with the option's letter from
  the given choices directly."``, mlvu_mc_count.yaml:6-8) scored by ``mcq_acc`` pooled (:164-207). lmms_eval scores
  ``extract_mcq_answer`` and reports the **mean over its 7 task types**, an absent type counting 0
  (LE tasks/mlvu/utils.py:89-128). lmms-eval's own dev rows ``{video_name, question (options inside), answer
  letter, task_type}`` also load (LE mlvu_dev.yaml, utils.py:55-62).
- ``lvbench``: VCF tasks/lvbench/utils.py:51-60 (candidates already read ``"(A) 1636"``, so the prompt shows
  ``"A. (A) 1636"``, as upstream), ``mcq_acc`` pooled percent (:63-158). lmms_eval: ``extract_mcq_answer``, the mean
  of 0/1 scores, a fraction (LE tasks/lvbench/utils.py, lvbench.yaml ``aggregation: mean``). Per ``question_type``
  (a question may have several) and per video ``type`` (``categories``).
- ``mcq``: our layout, ``[{id, video, question, options, answer letter, task?, duration?}]``, MVBench's prompt;
  videochat_flash parses with ``mcq_acc``, lmms_eval with ``extract_mcq_answer``.

Added here, not upstream: malformed records are reported by :func:`~pipeline.eval.benchmarks.base.skipped` and the
rest scored; items without a prediction are wrong (``unanswered``); answers with no letter are wrong (``invalid``);
predictions for unknown ids are ignored (``unknown_predictions``).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.eval.benchmarks.base import Benchmark, InputError, skipped

VARIANTS = ("videochat_flash", "lmms_eval")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

MVBENCH_POST = "\nOnly give the best option."  # VCF tasks/mvbench/mvbench_action_antonym.yaml:8
VIDEOMME_PRE = (  # VCF tasks/videomme/utils.py:199
    "These are the frames of a video. Select the best answer to the following multiple-choice question based on the "
    "video. Respond with only the letter (A, B, C, or D) of the correct option."
)
VIDEOMME_POST = "\nAnswer with the option's letter from the given choices directly."  # VCF videomme.yaml
PERCEPTION_POST = "\nOnly give the best option."  # VCF tasks/perceptiontest/val/utils.py:69
LVB_POST = "Answer with the option's letter from the given choices directly.\n"  # longvideobench_val_v.yaml
MLVU_POST = "Answer with the option's letter from the given choices directly."  # VCF mlvu_mc_count.yaml:8
LVBENCH_POST = "Answer with the option's letter from the given choices directly."  # VCF lvbench/_default_template
MLVU_TASK_TYPES = ("anomaly_reco", "count", "ego", "needle", "order", "plotQA", "topic_reasoning")  # LE mlvu :96

# VCF tasks/mvbench/utils.py:18-39: the folder each subtask's videos lie in (its "your_data_dir/" dropped).
MVBENCH_FOLDERS = {
    "action_sequence": "star/Charades_v1_480/",
    "action_prediction": "star/Charades_v1_480/",
    "action_antonym": "ssv2-video/",
    "fine_grained_action": "Moments_in_Time_Raw/videos/",
    "unexpected_action": "funqa-test/test/",
    "object_existence": "clevrer/video_validation/",
    "object_interaction": "star/Charades_v1_480/",
    "object_shuffle": "perception/videos/",
    "moving_direction": "clevrer/video_validation/",
    "action_localization": "sta/sta_video/",
    "scene_transition": "scene-qa/video/",
    "action_count": "perception/videos/",
    "moving_count": "clevrer/video_validation/",
    "moving_attribute": "clevrer/video_validation/",
    "state_change": "perception/videos/",
    "fine_grained_pose": "nturgbd/",
    "character_order": "perception/videos/",
    "egocentric_navigation": "vlnqa/",
    "episodic_reasoning": "tvqa/frames_fps3_hq/",
    "counterfactual_inference": "clevrer/video_validation/",
}

# ---------------------------------------------------------------------------------------------------------------
# Letter parsers: text -> letter, or "" when none is found.

# VCF tasks/mvbench/utils.py:125-164 (mcq_acc, the same in mlvu_mc and lvbench)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_OPTION_DOT = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LONE_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def mcq_acc_letter(text: str) -> str:
    """The letter ``mcq_acc``'s ``process`` reads from an answer (VCF tasks/mvbench/utils.py:140-164).

    ``"B. text"`` gives ``B``; otherwise the punctuation is blanked (:130-138, its period strip limited to 32
    replacements because ``re.UNICODE`` lands in ``count``), the text lower-cased, and the first standalone letter
    a-e, so ``"a man opens it"`` reads as ``A``. Returns ``""`` where upstream keeps the processed text (which never
    equals a letter).
    """
    match = _OPTION_DOT.match(text.strip())
    if match:
        return match.group(1).upper()
    answer = text.replace("\n", " ").replace("\t", " ").strip()
    out = answer
    blank = _COMMA_STRIP.search(answer) is not None
    for p in _PUNCT:
        if blank or p + " " in answer or " " + p in answer:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, 32)
    out = out.strip("'").strip('"').strip(")").strip("(").strip().lower()
    match = _LONE_LETTER.search(out)
    return match.group(1).upper() if match else ""


# VCF tasks/videomme/utils.py:282-301 (the missing commas are upstream's)
_VCF_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option isThe correct option is",
    "Best answer:Best option:",
)
_ABCD = re.compile(r"[ABCD]")


def videomme_vcf_letter(text: str) -> str:
    """VideoChat-Flash's Video-MME ``extract_characters_regex`` (VCF tasks/videomme/utils.py:282-301): drop the
    prefixes, ``""`` for an answer over 10 words without A-D, else the first ``[ABCD]`` anywhere."""
    s = text.strip()
    for prefix in _VCF_PREFIXES:
        s = s.replace(prefix, "")
    match = _ABCD.search(s)
    return match[0] if match else ""


# LE lmms_eval/tasks/_task_utils/mcq_extract.py:19-63
_ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは",
)  # fmt: skip
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}  # fmt: skip


def extract_mcq_answer(response: str, choices: Iterable[str] = "ABCD") -> str:
    """lmms-eval's ``extract_mcq_answer`` (LE lmms_eval/tasks/_task_utils/mcq_extract.py:66-158): every letter in
    the formats ``(A)``, ``A.``, ``A:``, ``A)``, ``A ``, after an answer phrase, at the start or the end, ranked by
    format and then by position (the last wins). Returns the letter or ``""``."""
    if not response or not response.strip():
        return ""
    choices = tuple(choices)
    text = response.strip()
    for char in (",", ".", "!", "?", ";", ":", "'", '"'):
        text = text.strip(char)
    text = " " + text + " "
    cands: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for fmt, name in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"), ("{})", "right_paren"),
                      ("{} ", "space")):  # fmt: skip
        for ch in choices:
            pos = text.rfind(fmt.format(ch))
            if pos != -1:
                cands.append((_PRIORITY[name], pos, ch))
    lower = text.lower()
    for phrase in _ANSWER_PHRASES:
        idx = lower.find(phrase)
        if idx != -1:
            after = idx + len(phrase)
            for ch in choices:
                pos = text.find(ch, after)
                if pos != -1:
                    cands.append((7, pos, ch))
    stripped = text.strip()
    for ch in choices:
        if stripped.startswith(ch) and (len(stripped) == 1 or not stripped[1].isalpha()):
            cands.append((10, 0, ch))
    for ch in choices:
        if stripped.endswith(ch) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            cands.append((9, len(text) - 1, ch))
    if not cands:
        for ch in choices:
            pos = text.rfind(ch)
            if pos != -1:
                cands.append((0, pos, ch))
    if not cands:
        return ""
    # upstream: sort by (priority, position) descending, stable; the first wins
    best = cands[0]
    for c in cands[1:]:
        if (c[0], c[1]) > (best[0], best[1]):
            best = c
    return best[2]


_PT_LETTER = re.compile(r"\b([A-D])\b")


def perception_letter(text: str) -> str:
    """Perception Test's ``\\b([A-D])\\b`` on the stripped answer (VCF tasks/perceptiontest/val/utils.py:111-120)."""
    match = _PT_LETTER.search(text.strip())
    return match.group(1) if match else ""


def mmmu_letter(response: str, options: list[str]) -> str:
    """LongVideoBench's MMMU-style ``parse_multi_choice_response`` (VCF tasks/longvideobench/utils.py:214-272) over
    the letters of ``options``: ``(A)`` first, then ``A `` and ``A.``, then (answers over 5 words) option texts,
    the last occurrence winning; ``""`` where upstream picks a random letter."""
    all_choices = LETTERS[: len(options)]
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = " " + response + " "
    index_ans, with_brack = True, False
    cands = [ch for ch in all_choices if f"({ch})" in response]
    if cands:
        with_brack = True
    if not cands:
        cands = [ch for ch in all_choices if f"{ch} " in response]
    if not cands:
        cands = [ch for ch in all_choices if f"{ch}." in response]
    if not cands and len(response.split()) > 5:
        lower = response.lower()
        cands = [ch for ch, opt in zip(all_choices, options) if opt.lower() in lower]
        index_ans = not cands
    if not cands:
        return ""
    if len(cands) == 1:
        return cands[0]
    if index_ans:
        starts = [response.rfind(f"({c})" if with_brack else f" {c} ") for c in cands]
    else:
        lower = response.lower()
        starts = [lower.rfind(options[LETTERS.index(c)].lower()) for c in cands]
    return cands[starts.index(max(starts))]  # np.argmax: the first maximum


_ABCDE = re.compile(r"[ABCDE]")
_LVB_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer", "The best option is",
                 "The correct option is", "Best answer:", "Best option:")  # fmt: skip


def lvb_simple_letter(text: str) -> str:
    """lmms-eval's LongVideoBench parse (LE tasks/longvideobench/utils.py:187-213): drop the prefixes, the first
    ``[ABCDE]``; ``""`` where upstream picks a random letter."""
    s = text.strip()
    for prefix in _LVB_PREFIXES:
        s = s.replace(prefix, "")
    match = _ABCDE.search(s)
    return match[0] if match else ""


# ---------------------------------------------------------------------------------------------------------------
# Reading files


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(path, f"cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(path, f"line {n}: not JSON ({e.msg})") from None
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """Records of a JSON list, JSON lines or parquet file (parquet through pandas; numpy arrays become lists).

    Raises:
        InputError: unreadable, not JSON / parquet, or not a list of records.
    """
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pandas as pd

            frame = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is an input error
            raise InputError(path, f"cannot read parquet: {e}") from None
        rows = frame.to_dict("records")
        for row in rows:
            for key, value in row.items():
                if hasattr(value, "tolist"):
                    row[key] = value.tolist()
        return rows
    data = _read_json(path)
    if isinstance(data, dict):
        data = [data] if "question" in data else list(data.values())
    if not isinstance(data, list):
        raise InputError(path, "expected a list of records")
    return data


def read_predictions(path: str | Path) -> dict[str, str]:
    """Predictions ``{id: text}`` from JSON lines ``{"id", "prediction"}``, a JSON list of those, or a JSON dict
    ``{id: text}``.

    Raises:
        InputError: unreadable or not JSON, a record without ``id``/``prediction``, a non-string prediction.
    """
    path = Path(path)
    data = _read_json(path)
    if isinstance(data, dict) and not ("id" in data or "prediction" in data):
        out = {}
        for key, value in data.items():
            if not isinstance(value, str):
                raise InputError(path, f"prediction for {key!r} is not a string")
            out[str(key)] = value
        return out
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise InputError(path, "expected JSON lines or a list of {id, prediction}")
    out = {}
    for n, rec in enumerate(data):
        if not isinstance(rec, dict) or "id" not in rec or "prediction" not in rec:
            raise InputError(path, f"record {n}: expected {{'id', 'prediction'}}")
        if not isinstance(rec["prediction"], str):
            raise InputError(path, f"record {n}: prediction is not a string")
        out[str(rec["id"])] = rec["prediction"]
    return out


class _Bad(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def _need(rec: Any, field: str, kind: type | tuple = str) -> Any:
    if not isinstance(rec, dict):
        raise _Bad("record", "not an object")
    if field not in rec or rec[field] is None:
        raise _Bad(field, "missing")
    value = rec[field]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _Bad(field, f"not {getattr(kind, '__name__', 'the right type')}")
    return value


def _options(rec: dict, field: str = "candidates") -> list[str]:
    opts = _need(rec, field, list)
    if len(opts) < 2 or len(opts) > len(LETTERS) or not all(isinstance(o, str) for o in opts):
        raise _Bad(field, "expected 2 or more option strings")
    return opts


def _text_answer(rec: dict, opts: list[str]) -> str:
    answer = _need(rec, "answer")
    if answer not in opts:  # VCF tasks/mvbench/utils.py:190-193 (the first equal candidate)
        raise _Bad("answer", "not among the candidates")
    return LETTERS[opts.index(answer)]


def _letter_answer(rec: dict, opts: list[str]) -> str:
    answer = _need(rec, "answer")
    if len(answer) != 1 or answer not in LETTERS[: len(opts)]:
        raise _Bad("answer", f"letter {answer!r} outside the {len(opts)} options")
    return answer


def _candidate_fields(rec: Any) -> tuple[str, str, list[str], str]:
    """``(question, video, options, answer letter)`` of a ``{video, question, candidates, answer text}`` record
    (MVBench, MLVU, LVBench as VideoChat-Flash ships them)."""
    opts = _options(rec)
    question = _need(rec, "question")
    video = _need(rec, "video")
    return question, video, opts, _text_answer(rec, opts)


def _rows(path: Path, key: str | None = None) -> Iterable[tuple[Any, Any]]:
    """``(record, row)`` of each row of ``path``: ``record`` (as skipped records name it) is the row's ``key``
    field where it has one, else its index."""
    return ((r.get(key, i) if key is not None and isinstance(r, dict) else i, r) for i, r in enumerate(read_rows(path)))


def _load_file(path: str | Path, build: Callable[[Any, Any], dict], key: str | None = None) -> tuple[list, list]:
    """The items ``build`` makes of one file's rows, and the skipped records (:func:`_rows` names them)."""
    path = Path(path)
    items: list[dict] = []
    bad: list[dict] = []
    _collect(path, _rows(path, key), build, items, bad, set())
    return items, bad


def _collect(path: Path, rows: Iterable[tuple[Any, Any]], build: Callable[[Any, Any], dict],
             items: list, bad: list, seen: set) -> None:  # fmt: skip
    for record, rec in rows:
        try:
            item = build(record, rec)
        except _Bad as e:
            bad.append(skipped(path, record, e.field, e.reason))
            continue
        if item["id"] in seen:
            bad.append(skipped(path, record, "id", f"duplicate id {item['id']!r}"))
            continue
        seen.add(item["id"])
        items.append(item)


def _item(id_, video, prompt, answer, options, task=None, duration=None, **extra) -> dict:
    item = {"id": str(id_), "video": video, "prompt": prompt, "answer": answer, "options": options,
            "task": task, "duration": duration}  # fmt: skip
    item.update(extra)
    return item


def _paren_options(opts: list[str]) -> str:
    return "".join(f"({LETTERS[i]}) {o}\n" for i, o in enumerate(opts))


def _mvbench_prompt(question: str, opts: list[str]) -> str:
    """MVBench's prompt (VCF tasks/mvbench/utils.py:108-121)."""
    return "Question: " + question + "\nOption:\n" + _paren_options(opts) + MVBENCH_POST


def _json_folder(path: Path) -> list[Path]:
    folder = path / "json" if (path / "json").is_dir() else path
    files = sorted(folder.glob("*.json"))
    if not files:
        raise InputError(path, "no <subtask>.json files")
    return files


# ---------------------------------------------------------------------------------------------------------------
# Loaders: (path) -> (items, skipped records)


def load_mvbench(path: str | Path) -> tuple[list[dict], list[dict]]:
    """MVBench: a folder with ``json/<subtask>.json`` (or the ``json`` folder itself), each a list of ``{video,
    question, candidates, answer text}`` (VCF eval_annotations/MVBench/json/*.json). Item id ``<subtask>/<index>``,
    ``task`` the subtask, ``video_folder`` the subtask's video folder (VCF tasks/mvbench/utils.py:18-39), prompt
    VCF :108-121.

    Raises:
        InputError: no json files, or a file that is not JSON or not a list.
    """
    path = Path(path)
    items: list[dict] = []
    bad: list[dict] = []
    seen: set = set()
    for file in _json_folder(path):
        sub = file.stem

        def build(i, rec, sub=sub):
            question, video, opts, answer = _candidate_fields(rec)
            return _item(f"{sub}/{i}", video, _mvbench_prompt(question, opts), answer, opts, task=sub,
                         video_folder=MVBENCH_FOLDERS.get(sub))  # fmt: skip

        _collect(file, _rows(file), build, items, bad, seen)
    return items, bad


def load_videomme(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Video-MME rows (its ``test-00000-of-00001.parquet``, or the same rows as JSON / JSON lines): ``video_id,
    duration, domain, sub_category, videoID, question_id, task_type, question, options ["A. ...", ...], answer``.
    Item id ``question_id``, video ``videoID + ".mp4"`` (VCF tasks/videomme/utils.py:182), prompt :195-206,
    ``task`` = task_type, ``duration`` = short/medium/long.

    Raises:
        InputError: the file cannot be read.
    """

    def build(i, rec):
        qid = _need(rec, "question_id")
        video = _need(rec, "videoID")
        question = _need(rec, "question")
        opts = _options(rec, "options")
        duration = _need(rec, "duration")
        task = _need(rec, "task_type")
        answer = _letter_answer(rec, opts)
        prompt = VIDEOMME_PRE + "\n" + "Question: " + question + "\nOption:\n" + "\n".join(opts) + VIDEOMME_POST
        return _item(qid, video + ".mp4", prompt, answer, opts, task=task, duration=duration,
                     category=rec.get("domain"), sub_category=rec.get("sub_category"))  # fmt: skip

    return _load_file(path, build, key="question_id")


def load_perceptiontest(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Perception Test mc val rows (lmms-eval/PerceptionTest_Val ``mc_question_val``, JSON / JSON lines / parquet):
    ``video_name, question_id, question, options (3), answer_id (0-2), area, reasoning, tag``. Item id
    ``<video_name>/<question_id>``, video ``video_name + ".mp4"`` (VCF tasks/perceptiontest/val/utils.py:36), prompt
    :48-71, ``task`` = area.

    Raises:
        InputError: the file cannot be read.
    """

    def build(i, rec):
        name = _need(rec, "video_name")
        qid = _need(rec, "question_id", (str, int))
        question = _need(rec, "question")
        opts = _options(rec, "options")
        answer_id = rec.get("answer_id")
        try:
            answer_id = int(answer_id)
        except (TypeError, ValueError):
            raise _Bad("answer_id", "missing or not an integer") from None
        if not 0 <= answer_id < min(len(opts), 4):
            raise _Bad("answer_id", f"{answer_id} outside the {len(opts)} options")
        question_text = question + "".join(f"\n({'ABC'[min(k, 2)]}). {o}" for k, o in enumerate(opts))
        prompt = f"\nQuestion: {question_text}{PERCEPTION_POST}"
        return _item(f"{name}/{qid}", name + ".mp4", prompt, LETTERS[answer_id], opts, task=rec.get("area"))

    return _load_file(path, build)


def load_longvideobench(path: str | Path) -> tuple[list[dict], list[dict]]:
    """LongVideoBench ``lvb_val.json``: ``{id, video_path, question, candidates (or option0..option4 with "N/A"),
    correct_choice (int), duration_group, question_category, ...}``. Item id ``id``, ``task`` the question
    category, ``duration`` the duration group (as a string), prompt VCF tasks/longvideobench/utils.py:119-157
    without the subtitle block.

    Raises:
        InputError: the file cannot be read.
    """

    def build(i, rec):
        id_ = _need(rec, "id")
        if isinstance(rec.get("candidates"), list):
            opts = _options(rec)
        else:
            opts = [rec[f"option{k}"] for k in range(5) if rec.get(f"option{k}") not in (None, "N/A")]
            if len(opts) < 2 or not all(isinstance(o, str) for o in opts):
                raise _Bad("candidates", "missing")
        choice = _need(rec, "correct_choice", int)
        if not 0 <= choice < len(opts):
            raise _Bad("correct_choice", f"{choice} outside the {len(opts)} options")
        video = _need(rec, "video_path")
        question = _need(rec, "question")
        group = _need(rec, "duration_group", (int, str))
        category = _need(rec, "question_category")
        q = question + "\n" + "\n".join(". ".join([f"({LETTERS[k]})", c]) for k, c in enumerate(opts))
        return _item(id_, video, f"{q}\n{LVB_POST}", LETTERS[choice], opts, task=category, duration=str(group))

    return _load_file(path, build)


_MLVU_PREFIX = re.compile(r"^\d+_")


def load_mlvu(path: str | Path) -> tuple[list[dict], list[dict]]:
    """MLVU multiple choice (dev). A folder (VideoChat-Flash's ``MLVU_MC/json/<n>_<task>.json``, each ``{video,
    duration, question, candidates, answer text, question_type}``; id ``<file stem>/<index>``, prompt VCF
    tasks/mlvu_mc/utils.py:96-108), or one file of lmms-eval's dev rows ``{video_name, question (options inside),
    answer letter, task_type}`` (id = index, prompt the question plus ``"\\nOnly give the best option.\\nBest
    option: ("``, LE tasks/mlvu/mlvu_dev.yaml). ``task`` is the question type.

    Raises:
        InputError: no json files, or a file that cannot be read.
    """
    path = Path(path)
    items: list[dict] = []
    bad: list[dict] = []
    seen: set = set()
    if path.is_dir():
        for file in _json_folder(path):
            stem = file.stem

            def build(i, rec, stem=stem):
                question, video, opts, answer = _candidate_fields(rec)
                task = rec.get("question_type") or _MLVU_PREFIX.sub("", stem)
                prompt = "Question:" + question + "\nOption:\n" + _paren_options(opts) + MLVU_POST
                return _item(f"{stem}/{i}", video, prompt, answer, opts, task=task)

            _collect(file, _rows(file), build, items, bad, seen)
        return items, bad

    def build_dev(i, rec):
        question = _need(rec, "question")
        video = _need(rec, "video_name")
        task = _need(rec, "task_type")
        answer = _need(rec, "answer")
        if answer not in "ABCD" or len(answer) != 1:
            raise _Bad("answer", f"letter {answer!r} not A-D")
        prompt = question + "\nOnly give the best option.\nBest option: ("
        return _item(str(rec.get("question_id", i)), video, prompt, answer, None, task=task)

    _collect(path, _rows(path), build_dev, items, bad, seen)
    return items, bad


def load_lvbench(path: str | Path) -> tuple[list[dict], list[dict]]:
    """LVBench as VideoChat-Flash ships it (``LVBench/json/lvbench_clean.json``, or any such file): ``{video, type,
    question, candidates ["(A) ...", ...], answer text, question_type [..], time_reference}``. Item id = index in
    the file (or ``uid`` where present), video ``video + ".mp4"``, ``task`` the first question type (``tasks`` all of
    them), ``category`` the video type, prompt VCF tasks/lvbench/utils.py:51-60.

    Raises:
        InputError: the file cannot be read.
    """
    path = Path(path)
    if path.is_dir():
        path = (path / "json" / "lvbench_clean.json") if (path / "json").is_dir() else path / "lvbench_clean.json"

    def build(i, rec):
        question, video, opts, answer = _candidate_fields(rec)
        types = rec.get("question_type") or []
        types = [types] if isinstance(types, str) else [t for t in types if isinstance(t, str)]
        prompt = question + "\n" + "".join(f"{LETTERS[k]}. {o}\n" for k, o in enumerate(opts)) + LVBENCH_POST
        return _item(rec.get("uid", i), video + ".mp4", prompt, answer, opts, task=types[0] if types else None,
                     tasks=types, category=rec.get("type"))  # fmt: skip

    return _load_file(path, build)


def load_mcq(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Our generic layout: a JSON list (or JSON lines) of ``{id, video, question, options [..], answer letter,
    task?, duration?}``; prompt MVBench's (VCF tasks/mvbench/utils.py:108-121).

    Raises:
        InputError: the file cannot be read.
    """

    def build(i, rec):
        id_ = _need(rec, "id", (str, int))
        video = _need(rec, "video")
        question = _need(rec, "question")
        opts = _options(rec, "options")
        answer = _letter_answer(rec, opts)
        return _item(id_, video, _mvbench_prompt(question, opts), answer, opts, task=rec.get("task"),
                     duration=rec.get("duration"))  # fmt: skip

    return _load_file(path, build, key="id")


# ---------------------------------------------------------------------------------------------------------------
# Scoring

# per (benchmark, variant): parser, units, overall ("pooled" / "task_mean7"), drop "" from the denominator, rounding
_RULES: dict[tuple[str, str], tuple[str, str, str, bool, int | None]] = {
    ("mcq", "videochat_flash"): ("mcq_acc", "percent", "pooled", False, None),
    ("mcq", "lmms_eval"): ("extract", "percent", "pooled", False, None),
    ("mvbench", "videochat_flash"): ("mcq_acc", "percent", "pooled", True, None),
    ("mvbench", "lmms_eval"): ("mcq_acc", "percent", "pooled", True, None),
    ("videomme", "videochat_flash"): ("videomme_vcf", "percent", "pooled", False, None),
    ("videomme", "lmms_eval"): ("extract", "percent", "pooled", False, None),
    ("perceptiontest", "videochat_flash"): ("perception", "fraction", "pooled", False, None),
    ("perceptiontest", "lmms_eval"): ("perception", "fraction", "pooled", False, None),
    ("longvideobench", "videochat_flash"): ("mmmu", "fraction", "pooled", False, 5),
    ("longvideobench", "lmms_eval"): ("lvb_simple", "fraction", "pooled", False, 5),
    ("mlvu", "videochat_flash"): ("mcq_acc", "percent", "pooled", True, None),
    ("mlvu", "lmms_eval"): ("extract", "percent", "task_mean7", False, None),
    ("lvbench", "videochat_flash"): ("mcq_acc", "percent", "pooled", True, None),
    ("lvbench", "lmms_eval"): ("extract", "fraction", "pooled", False, None),
}


def _parser(name: str) -> Callable[[str, dict], str]:
    if name == "mcq_acc":
        return lambda text, item: mcq_acc_letter(text)
    if name == "videomme_vcf":
        return lambda text, item: videomme_vcf_letter(text)
    if name == "extract":
        return lambda text, item: extract_mcq_answer(text, "ABCD" if item["options"] is None
                                                     else LETTERS[: len(item["options"])])  # fmt: skip
    if name == "perception":
        return lambda text, item: perception_letter(text)
    if name == "mmmu":
        return lambda text, item: mmmu_letter(text, item["options"])
    if name == "lvb_simple":
        return lambda text, item: lvb_simple_letter(text)
    raise ValueError(name)


def parse_letter(benchmark: str, text: str, item: dict, variant: str = "videochat_flash") -> str:
    """The option letter ``benchmark``'s scorer (``variant``) reads from ``text`` for ``item``; ``""`` if none.

    Raises:
        ValueError: unknown benchmark or variant.
    """
    if (benchmark, variant) not in _RULES:
        raise ValueError(f"unknown benchmark/variant {benchmark!r}/{variant!r}")
    return _parser(_RULES[benchmark, variant][0])(text, item)


def score(benchmark: str, items: list[dict], predictions: dict[str, str], variant: str = "videochat_flash") -> dict:
    """Accuracy of ``predictions`` ``{id: text}`` on ``items`` as ``benchmark``'s upstream scorer (``variant``)
    computes it.

    Returns:
        ``{"benchmark", "variant", "units" ("percent" or "fraction"), "overall", "tasks" {task: acc}, "durations"
        {bucket: acc}, "categories" {category: acc} (Video-MME domain, LVBench type; where present), "task_mean"
        (unweighted mean over tasks), "count", "correct", "unanswered", "invalid", "unknown_predictions",
        "excluded_empty"}``. ``overall`` pools all items, except lmms_eval's MLVU (mean over its 7 task types).
        Items whose prediction is exactly ``""`` leave the denominators where upstream drops them (MVBench, MLVU and
        LVBench under videochat_flash: ``excluded_empty``); a missing prediction always counts as wrong.

    Raises:
        ValueError: unknown benchmark or variant.
    """
    if (benchmark, variant) not in _RULES:
        raise ValueError(f"unknown benchmark/variant {benchmark!r}/{variant!r}; variants: {', '.join(VARIANTS)}")
    parser_name, units, overall_rule, drop_empty, ndigits = _RULES[benchmark, variant]
    parse = _parser(parser_name)
    scale = 100.0 if units == "percent" else 1.0
    groups: dict[str, dict[str, list[int]]] = {"tasks": defaultdict(lambda: [0, 0]),
                                               "durations": defaultdict(lambda: [0, 0]),
                                               "categories": defaultdict(lambda: [0, 0])}  # fmt: skip
    correct = total = unanswered = invalid = excluded = 0
    ids = set()
    for item in items:
        ids.add(item["id"])
        text = predictions.get(item["id"])
        if text is None:
            unanswered += 1
            hit = 0
        else:
            if drop_empty and text == "":
                excluded += 1
                continue
            letter = parse(text, item)
            if not letter:
                invalid += 1
            hit = int(letter == item["answer"])
        total += 1
        correct += hit
        for task in item.get("tasks") or ([item["task"]] if item.get("task") is not None else []):
            cell = groups["tasks"][str(task)]
            cell[0] += hit
            cell[1] += 1
        for key, field in (("durations", "duration"), ("categories", "category")):
            if item.get(field) is not None:
                cell = groups[key][str(item[field])]
                cell[0] += hit
                cell[1] += 1

    def acc(c: int, n: int) -> float:
        value = scale * c / n if n else 0.0
        return round(value, ndigits) if ndigits is not None else value

    out: dict[str, Any] = {"benchmark": benchmark, "variant": variant, "units": units}
    for key, table in groups.items():
        out[key] = {name: acc(c, n) for name, (c, n) in sorted(table.items())}
    tasks = out["tasks"]
    if overall_rule == "task_mean7":  # LE tasks/mlvu/utils.py:96-128
        per = {t: acc(*groups["tasks"][t]) if t in groups["tasks"] else 0.0 for t in MLVU_TASK_TYPES}
        out["overall"] = sum(per.values()) / len(per)
    else:
        out["overall"] = acc(correct, total)
    out["task_mean"] = sum(tasks.values()) / len(tasks) if tasks else None
    unknown = sum(1 for key in predictions if key not in ids)
    out.update(count=len(items), correct=correct, unanswered=unanswered, invalid=invalid,
               unknown_predictions=unknown, excluded_empty=excluded)  # fmt: skip
    return out


def _scorer(name: str) -> Callable[..., dict]:
    def run(items: list[dict], predictions: dict[str, str], variant: str = "videochat_flash", **_: Any) -> dict:
        return score(name, items, predictions, variant=variant)

    run.__name__ = f"score_{name}"
    run.__doc__ = f"{name}: :func:`score` with ``benchmark={name!r}``."
    return run


_LOADERS = {
    "mcq": load_mcq,
    "mvbench": load_mvbench,
    "videomme": load_videomme,
    "perceptiontest": load_perceptiontest,
    "longvideobench": load_longvideobench,
    "mlvu": load_mlvu,
    "lvbench": load_lvbench,
}

BENCHMARKS: dict[str, Benchmark] = {
    name: Benchmark(name=name, format="mcq", load=loader, score=_scorer(name), read_predictions=read_predictions,
                    options=VARIANTS)  # fmt: skip
    for name, loader in _LOADERS.items()
}
