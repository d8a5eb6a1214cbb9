"""Annotation formats of the five systems, each converted to LLaVA conversation records.

Every converter reads the files a system publishes, unchanged, and yields one :class:`Converted` per entry: a
record, or the reason the entry is unusable (the file, the entry's index or id, the field). A record is::

    {"id": str, "video": <video_id>, "conversations": [{"from": "human", "value": "<video>\\n..."}, ...],
     "video_path": <the entry's own reference, when it names a file>, "modality": "video" | "image",
     "timestamps": {"src": [...], "tgt": [...]}, "duration": seconds}   # the last two for E.T. Instruct

``video`` is the id the manifest gives the video: the entry's id for id-based formats (VideoInstruct-100K, SSv2),
and for path-based formats :func:`pipeline.manifest.folder_video_id` of the path, which is the id
``python -m pipeline.manifest folder --root <root>`` gives the same file.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from pipeline import VIDEO_TOKEN
from pipeline.manifest import VIDEO_EXTENSIONS, folder_video_id

IMAGE_TOKEN = "<image>"
MATCH_TOKEN = "<vid>"  # E.T. Chat's timestamp placeholder
NOISE = "QA_GT_caption_based_noisy"  # GPT debris at the end of some VideoInstruct-100K answers


@dataclass
class Options:
    """How a dataset's entries are read.

    Attributes:
        root: the folder the entries' video paths are relative to (class_folders: the dataset folder itself).
        labels: SSv2's ``labels.json`` (official layout) or ``id2label.json`` (the LLaVA fork's csv layout).
        images: ``drop`` or ``keep`` image records of LLaVA-style files (counted either way).
        split: class_folders: take only ``train``, ``test`` or ``val`` videos (None: all).
        video_placement: videochatgpt_qa: ``alternate`` (Video-ChatGPT's converter: after the question for even
            entries, before it for odd ones), ``before`` or ``after``.
        seed: seed of the class_folders question phrasing.
    """

    root: str | None = None
    labels: str | None = None
    images: str = "drop"
    split: str | None = None
    video_placement: str = "alternate"
    seed: int = 0


@dataclass
class Converted:
    """One entry of an annotation file: ``record`` or, when it is unusable, ``kind`` and ``reason``."""

    where: str
    record: dict | None = None
    kind: str = ""
    reason: str = ""
    entry: object = field(default=None, repr=False)


class EntryError(Exception):
    """An entry that cannot be converted; ``kind`` groups the reasons in the counts."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _schema_error(validator: Draft202012Validator, entry) -> str | None:
    error = best_match(validator.iter_errors(entry))
    if error is None:
        return None
    where = ".".join(str(part) for part in error.absolute_path) or "entry"
    return f"{where}: {error.message}"


def _checked(schema: dict) -> Callable[[object], None]:
    validator = Draft202012Validator(schema)

    def check(entry) -> None:
        problem = _schema_error(validator, entry)
        if problem:
            raise EntryError("invalid entry", problem)

    return check


def video_reference(path: str, root: str | None) -> str:
    """The manifest's ``video_id`` of a video path that an entry names, relative to ``root``.

    Raises:
        EntryError: the path escapes ``root`` (``..`` or an absolute path elsewhere).
    """
    pure = PurePosixPath(path)
    if pure.is_absolute():
        if root is None or not Path(path).resolve().is_relative_to(Path(root).resolve()):
            raise EntryError("unsafe path", f"video: absolute path {path!r} outside the dataset root {root!r}")
        pure = PurePosixPath(Path(path).resolve().relative_to(Path(root).resolve()).as_posix())
    parts = []
    for part in pure.parts:
        if part == "..":
            if not parts:
                raise EntryError("unsafe path", f"video: {path!r} escapes the dataset root")
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts:
        raise EntryError("invalid entry", f"video: {path!r} names no file")
    return folder_video_id(Path(*parts))


def _marked(conversations: list[dict]) -> list[dict]:
    """Conversations with the visual marker (``<image>`` or ``<video>``) written as ``<video>`` and, when there is
    exactly one, moved to the front of its turn (several are left for the checks to reject)."""
    out = [{"from": t["from"], "value": t["value"].replace(IMAGE_TOKEN, VIDEO_TOKEN)} for t in conversations]
    if sum(t["value"].count(VIDEO_TOKEN) for t in out) == 1:
        for turn in out:
            if VIDEO_TOKEN in turn["value"]:
                turn["value"] = VIDEO_TOKEN + "\n" + turn["value"].replace(VIDEO_TOKEN, "").strip()
    return out


# --- Video-ChatGPT ---------------------------------------------------------------------------------------------

_VIDEOCHATGPT = _checked({
    "type": "object", "required": ["video_id", "q", "a"],
    "properties": {"video_id": {"type": "string", "minLength": 1}, "q": {"type": "string", "minLength": 1},
                   "a": {"type": "string"}},
})


def videochatgpt_qa(source: Path, options: Options) -> Iterator[Converted]:
    """Video-ChatGPT's VideoInstruct-100K: a JSON list of ``{"video_id", "q", "a"}``, one QA pair per entry (about
    100K pairs over 11K ActivityNet videos: ids repeat).

    One single-turn record per pair, ``id`` ``<video_id>_<n>``. ``<video>`` goes after the question for even
    entries and before it for odd ones, as ``scripts/convert_instruction_json_to_training_format.py`` does
    (``video_placement`` changes that). The ``QA_GT_caption_based_noisy`` debris is removed from answers, as
    LLaVA-NeXT's ``preprocess_multimodal`` does, and the answer stripped.
    """
    per_video: dict[str, int] = {}
    for index, entry in enumerate(_load_json_list(source)):
        where = f"{source} entry {index}"
        try:
            _VIDEOCHATGPT(entry)
            video, question = entry["video_id"].strip(), entry["q"].strip()
            answer = entry["a"].replace(NOISE, "").strip()
            after = {"alternate": index % 2 == 0, "after": True, "before": False}[options.video_placement]
            prompt = f"{question}\n{VIDEO_TOKEN}" if after else f"{VIDEO_TOKEN}\n{question}"
            n = per_video[video] = per_video.get(video, -1) + 1
            yield Converted(where, {"id": f"{video}_{n}", "video": video, "conversations": [
                {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}, entry=entry)
        except EntryError as exc:
            yield Converted(where, None, exc.kind, str(exc), entry)


# --- Video-LLaMA --------------------------------------------------------------------------------------------------

_VIDEOLLAMA = _checked({
    "type": "object", "required": ["video", "QA"],
    "properties": {
        "video": {"type": "string", "minLength": 1},
        "QA": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["q", "a"],
            "properties": {"q": {"type": "string", "minLength": 1}, "a": {"type": "string"}}}},
    },
})


def videollama_qa(source: Path, options: Options) -> Iterator[Converted]:
    """Video-LLaMA's fine-tuning format: a JSON list of ``{"video": path, "QA": [{"q", "a"}, ...]}``; several
    pairs become one multi-turn conversation, the video before the first question (Video-LLaMA
    ``video_llama/datasets/datasets/video_instruct_dataset.py``)."""
    for index, entry in enumerate(_load_json_list(source)):
        where = f"{source} entry {index}"
        try:
            _VIDEOLLAMA(entry)
            video = video_reference(entry["video"], options.root)
            turns = []
            for i, pair in enumerate(entry["QA"]):
                question = pair["q"].strip()
                turns += [{"from": "human", "value": f"{VIDEO_TOKEN}\n{question}" if i == 0 else question},
                          {"from": "gpt", "value": pair["a"].strip()}]
            yield Converted(where, {"id": f"{video}_{index}", "video": video, "video_path": entry["video"],
                                    "conversations": turns}, entry=entry)
        except EntryError as exc:
            yield Converted(where, None, exc.kind, str(exc), entry)


# --- class folders (action recognition) ---------------------------------------------------------------------------

ACTION_QUESTIONS = (
    "What action is shown in the video?",
    "What is the person in the video doing?",
    "Which activity does this video show?",
    "Describe the action in this video in a few words.",
)
SPLITS = ("train", "test", "val")


def readable_class(name: str) -> str:
    """A class folder's name as an answer: ``fall_down`` -> ``Fall down``, ``JumpingJack`` -> ``Jumping jack``."""
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ").replace("-", " ").split()
    text = " ".join(words).lower()
    return text[:1].upper() + text[1:]


def class_folders(source: Path, options: Options) -> Iterator[Converted]:
    """Action datasets laid out as ``<root>/<class>/<file>`` (the human-action set of the Video-LLaMA guide).

    Train/test come from a first folder level named ``train``/``test``/``val`` (``<root>/train/<class>/<file>``) or
    from a file-name prefix (``train_fall_down_video_127.avi``); ``split`` keeps one of them. Each video becomes one
    record: a question drawn (by the file's path and ``seed``) from :data:`ACTION_QUESTIONS`, answered with the class
    name made readable. ``video`` is the id ``python -m pipeline.manifest folder --root <root>`` gives the file.
    """
    root = Path(source)
    if not root.is_dir():
        yield Converted(str(root), None, "invalid entry", f"{root}: not a folder")
        return
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
    for path in files:
        relative = path.relative_to(root)
        parts = relative.parts
        where = f"{root} file {relative}"
        if len(parts) < 2:
            yield Converted(where, None, "invalid entry", f"{relative}: not inside a class folder", str(relative))
            continue
        split = parts[0].lower() if parts[0].lower() in SPLITS and len(parts) >= 3 else None
        label = parts[1] if split else parts[-2]
        if split is None:
            prefix = path.name.split("_", 1)[0].lower()
            split = prefix if prefix in SPLITS else None
        if options.split and split != options.split:
            continue
        digest = int(hashlib.sha1(f"{options.seed}:{relative.as_posix()}".encode()).hexdigest(), 16)
        question = ACTION_QUESTIONS[digest % len(ACTION_QUESTIONS)]
        video = folder_video_id(relative)
        yield Converted(where, {"id": video, "video": video, "video_path": relative.as_posix(), "conversations": [
            {"from": "human", "value": f"{VIDEO_TOKEN}\n{question}"},
            {"from": "gpt", "value": readable_class(label)}]}, entry=relative.as_posix())


# --- Something-Something-v2 ---------------------------------------------------------------------------------------

_SLOT = re.compile(r"\[[^\]]+\]")
_SSV2 = _checked({
    "type": "object", "required": ["id", "template"],
    "properties": {"id": {"type": ["string", "integer"]}, "template": {"type": "string", "minLength": 1},
                   "label": {"type": "string"}, "placeholders": {"type": "array", "items": {"type": "string"}}},
})
SSV2_QUESTION = "Describe this video."


def ssv2_answer(template: str, placeholders: list[str] | None) -> str:
    """An SSv2 class template with its ``[slots]`` filled by the video's placeholders in order (``Putting [something]
    on [something]`` + ``["a pen", "a book"]`` -> ``Putting a pen on a book``), or with the brackets removed when
    the placeholders do not match the slots."""
    slots = _SLOT.findall(template)
    if placeholders and len(placeholders) == len(slots):
        filled = iter(placeholders)
        return _SLOT.sub(lambda _: next(filled), template)
    return template.replace("[", "").replace("]", "")


def _ssv2_record(video: str, answer: str) -> dict:
    return {"id": video, "video": video, "conversations": [
        {"from": "human", "value": f"{VIDEO_TOKEN}\n{SSV2_QUESTION}"}, {"from": "gpt", "value": answer}]}


def ssv2(source: Path, options: Options) -> Iterator[Converted]:
    """Something-Something-v2's official ``something-something-v2-{train,validation}.json`` (``{"id", "label",
    "template", "placeholders"}``), checked against ``labels.json`` (template without brackets -> class index) when
    ``labels`` is given. Question "Describe this video." (the LLaVA video fork's), answer :func:`ssv2_answer`."""
    classes = json.loads(Path(options.labels).read_text()) if options.labels else None
    for index, entry in enumerate(_load_json_list(source)):
        where = f"{source} entry {index}"
        try:
            _SSV2(entry)
            template = entry["template"]
            if classes is not None and template.replace("[", "").replace("]", "") not in classes:
                raise EntryError("unknown label", f"template: {template!r} is not in {options.labels}")
            yield Converted(where, _ssv2_record(str(entry["id"]), ssv2_answer(template, entry.get("placeholders"))),
                            entry=entry)
        except EntryError as exc:
            yield Converted(where, None, exc.kind, str(exc), entry)


def ssv2_fork(source: Path, options: Options) -> Iterator[Converted]:
    """The LLaVA video fork's SSv2 layout (SeHwanJoo/LLaVA ``scripts/dataset/convert2instruct.py``): ``train.csv``
    lines ``<path> <class index>`` separated by spaces (VideoMAE's lists) and ``id2label.json`` (class index ->
    template). The video id is the file's stem; the answer is the template without brackets (the fork keeps them)."""
    if not options.labels:
        yield Converted(str(source), None, "invalid entry", "ssv2_fork needs labels: the id2label.json file")
        return
    id2label = json.loads(Path(options.labels).read_text())
    with open(source, newline="", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{source} line {number}"
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                yield Converted(where, None, "invalid entry", f"line {number}: expected '<path> <label>', got "
                                f"{line.strip()!r}", line)
                continue
            path, label = parts
            if label not in id2label:
                yield Converted(where, None, "unknown label", f"label: {label!r} is not in {options.labels}", line)
                continue
            try:
                video = video_reference(path, options.root) if options.root else folder_video_id(Path(Path(path).name))
            except EntryError as exc:
                yield Converted(where, None, exc.kind, str(exc), line)
                continue
            yield Converted(where, _ssv2_record(video, ssv2_answer(id2label[label], None)), entry=line)


# --- LLaVA, LLaVA-NeXT, LLaMA-VID ---------------------------------------------------------------------------------

_LLAVA = _checked({
    "type": "object", "required": ["conversations"],
    "properties": {
        "id": {"type": ["string", "integer"]},  # LLaMA-VID's WebVid ids are JSON integers
        "image": {"type": ["string", "array"]}, "video": {"type": "string", "minLength": 1},
        "conversations": {"type": "array", "minItems": 2, "items": {
            "type": "object", "required": ["from", "value"],
            "properties": {"from": {"enum": ["human", "gpt"]}, "value": {"type": "string"}}}},
    },
})


def llava(source: Path, options: Options) -> Iterator[Converted]:
    """LLaVA, LLaVA-NeXT and LLaMA-VID conversation files as published: ``{"id", "image" | "video",
    "conversations"}``, multi-turn, the visual input marked ``<image>`` (videos too). ``image`` wins when both are
    there, as in LLaVA-NeXT. Image records are kept or dropped by ``images`` and counted either way; text-only
    records are dropped and counted (this pipeline trains on video). The marker becomes ``<video>`` at the front of
    its turn, as LLaVA's ``preprocess_multimodal`` moves it."""
    for index, entry in enumerate(_load_json_list(source)):
        where = f"{source} entry {index}" + (f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry
                                             else "")
        try:
            _LLAVA(entry)
            if "image" in entry:
                if options.images != "keep":
                    raise EntryError("image record (dropped)", "image: image records are dropped (images: drop)")
                image = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
                reference, modality = image, "image"
            elif "video" in entry:
                reference, modality = entry["video"], "video"
            else:
                raise EntryError("text only (dropped)", "no image or video: text-only records are dropped")
            video = video_reference(reference, options.root)
            record = {"id": str(entry.get("id", index)), "video": video, "video_path": reference,
                      "conversations": _marked(entry["conversations"])}
            if modality == "image":
                record["modality"] = "image"
            yield Converted(where, record, entry=entry)
        except EntryError as exc:
            yield Converted(where, None, exc.kind, str(exc), entry)


# --- E.T. Instruct 164K -------------------------------------------------------------------------------------------

_ETCHAT = _checked({
    "type": "object", "required": ["video", "duration", "conversations"],
    "properties": {
        "task": {"type": "string"}, "source": {"type": "string"}, "video": {"type": "string", "minLength": 1},
        "duration": {"type": "number", "exclusiveMinimum": 0},
        "src": {"type": "array", "items": {"type": "number"}}, "tgt": {"type": "array", "items": {"type": "number"}},
        "conversations": {"type": "array", "minItems": 2, "items": {
            "type": "object", "required": ["from", "value"],
            "properties": {"from": {"enum": ["human", "gpt"]}, "value": {"type": "string"}}}},
    },
})


def render_timestamp(seconds: float) -> str:
    """A timestamp as E.T. Chat writes it in text (``--use_time_tag``: ``'{}s'.format(round(s, 1))``: ``12s`` for
    an integer, ``12.5s`` for a float)."""
    return f"{round(seconds, 1)}s"


def etchat(source: Path, options: Options) -> Iterator[Converted]:
    """E.T. Instruct 164K (``et_instruct_164k_vid.json``, E.T. Bench ``docs/DATASET.md``): ``{"task", "source",
    "video", "duration", "src", "tgt", "conversations"}`` where every timestamp in the text is a ``<vid>`` token and
    its value in seconds is in ``src`` (human turns) or ``tgt`` (gpt turns), in order.

    The timestamps are kept as the record's ``timestamps`` and ``duration``, and written into the text as E.T. Chat
    writes them (:func:`render_timestamp`). A count of ``<vid>`` that does not match ``src`` + ``tgt``, or a
    timestamp outside ``[0, duration]``, is a rejected entry; E.T. Chat clamps such timestamps silently.
    """
    for index, entry in enumerate(_load_json_list(source)):
        where = f"{source} entry {index}"
        try:
            _ETCHAT(entry)
            src, tgt, duration = entry.get("src", []), entry.get("tgt", []), float(entry["duration"])
            for name, values in (("src", src), ("tgt", tgt)):
                outside = [t for t in values if not 0 <= t <= duration]
                if outside:
                    raise EntryError("timestamp outside the video",
                                     f"{name}: {outside[0]} s outside the video's {duration} s")
            values = {"human": iter(src), "gpt": iter(tgt)}
            turns = []
            for turn in _marked(entry["conversations"]):
                expected = turn["value"].count(MATCH_TOKEN)
                stamps = [next(values[turn["from"]], None) for _ in range(expected)]
                if None in stamps:
                    raise EntryError("invalid entry", f"conversations: more {MATCH_TOKEN} than src/tgt timestamps")
                text = turn["value"]
                for stamp in stamps:
                    text = text.replace(MATCH_TOKEN, render_timestamp(stamp), 1)
                turns.append({"from": turn["from"], "value": text})
            if any(next(iterator, None) is not None for iterator in values.values()):
                raise EntryError("invalid entry", f"src/tgt: more timestamps than {MATCH_TOKEN} tokens")
            video = video_reference(entry["video"], options.root)
            yield Converted(where, {"id": f"{entry.get('source', 'et')}_{index}", "video": video,
                                    "video_path": entry["video"], "conversations": turns,
                                    "timestamps": {"src": src, "tgt": tgt}, "duration": duration,
                                    "task": entry.get("task", "")}, entry=entry)
        except EntryError as exc:
            yield Converted(where, None, exc.kind, str(exc), entry)


def _load_json_list(source: Path) -> list:
    """A JSON list (``.json``) or one JSON value per line (``.jsonl``).

    Raises:
        ValueError: the file is not a JSON list (names the file).
    """
    text = Path(source).read_text(encoding="utf-8")
    if str(source).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    return data


FORMATS: dict[str, Callable[[Path, Options], Iterator[Converted]]] = {
    "videochatgpt_qa": videochatgpt_qa,
    "videollama_qa": videollama_qa,
    "class_folders": class_folders,
    "ssv2": ssv2,
    "ssv2_fork": ssv2_fork,
    "llava": llava,
    "llamavid": llava,
    "etchat": etchat,
}
