"""Annotation formats of the five systems, each converted to LLaVA conversation records.

Every converter reads the files a system publishes, unchanged, and yields one :class:`Converted` per entry: a
record, or the reason the entry is unusable (the file, the entry's index or id, the field). An entry costs only
itself: a bad one is a rejected :class:`Converted`, never an exception, so its neighbours are kept. Only a file that
cannot be read at all (not UTF-8, not JSON, not a list) raises, with the file's name.

A record is::

    {"id": str, "conversations": [{"from": "human" | "gpt", "value": str}, ...],
     "video": <video_id>,                       # one visual input (a video, or an image with "modality": "image")
     "videos": [<video_id>, ...],               # or several: multi-image records (LLaVA-NeXT), "modality": "image"
     "video_path" | "video_paths": <the entry's own reference(s), when it names files>,
     "unanswered": true,                        # a question without a reference answer (SSv2's test split)
     "timestamps": {"src": [...], "tgt": [...]}, "duration": seconds, "task": str}   # E.T. Instruct

The visual fields and the ``<video>`` markers agree (:func:`pipeline.data.instructions.check_record`):

- ``video``: ``<video>`` exactly once, in the first human turn;
- ``videos`` (two or more): one ``<video>`` per visual, in human turns; the i-th marker of the conversation (in
  reading order) takes the features of ``videos[i]``;
- neither: a **text-only** record (LLaVA-665K's ShareGPT conversations), no marker, no features;
- ``unanswered``: the conversation ends with the question (a human turn); such records are evaluated, never trained.

:func:`visuals` gives the ids a record names, in marker order, whatever its kind.

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
FEATURE_EXTENSIONS = (".pkl", ".pickle", ".npy", ".npz", ".pt", ".pth", ".h5", ".hdf5", ".safetensors")
"""Suffixes of feature files (Video-ChatGPT's pickles, numpy and torch arrays), which a video field must not name."""

# C0 controls except tab, newline and carriage return; DEL; lone surrogates (Python's stand-ins for bytes that were
# not UTF-8, and what a JSON "\udce9" escape decodes to): none of them belongs in training text.
_BAD_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


@dataclass
class Options:
    """How a dataset's entries are read.

    Attributes:
        root: the folder the entries' video paths are relative to (class_folders: the dataset folder itself).
        labels: SSv2's ``labels.json`` (official layout) or ``id2label.json`` (the LLaVA fork's csv layout).
        images: ``keep`` (image records of LLaVA-style files train as one-frame videos; their pictures go through
            the video rules like videos) or ``drop`` them (counted either way).
        split: class_folders: take only ``train``, ``test`` or ``val`` videos (None: all).
        video_placement: videochatgpt_qa: ``alternate`` (Video-ChatGPT's converter: after the question for even
            entries, before it for odd ones), ``before`` or ``after``.
        seed: seed of the class_folders question phrasing.
        timestamps: etchat's ``<vid>`` files: ``text`` (the timestamps written into the text) or ``tokens`` (the
            ``<vid>`` tokens kept, with their seconds in the record's ``timestamps``: stages with ``matching``).
    """

    root: str | None = None
    labels: str | None = None
    images: str = "keep"
    split: str | None = None
    video_placement: str = "alternate"
    seed: int = 0
    timestamps: str = "text"


@dataclass
class Converted:
    """One entry of an annotation file: ``record`` or, when it is unusable, ``kind`` and ``reason``."""

    where: str
    record: dict | None = None
    kind: str = ""
    reason: str = ""
    entry: object = field(default=None, repr=False)


class EntryError(Exception):
    """An entry that cannot be converted; ``kind`` groups the reasons in the counts. The reason starts with the
    field it is about (``conversations[1].value: ...``)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def visuals(record: dict) -> list[str]:
    """The ids of the visual inputs ``record`` names, in marker order: ``videos``, else ``[video]``, else ``[]``
    (a text-only record)."""
    if "videos" in record:
        return list(record["videos"])
    return [record["video"]] if "video" in record else []


def text_problem(value: object, field: str = "") -> str | None:
    """Where the first string in ``value`` (walked through dict keys and values and lists) holds a control
    character (C0 but tab, newline and carriage return; DEL) or a lone surrogate, or None.

    Args:
        field: the name of ``value``; nested strings are named from it (``conversations[1].value``).

    Returns:
        ``"<field>: control character U+001B at character 5"`` (or ``lone surrogate ...``).
    """
    if isinstance(value, str):
        bad = _BAD_TEXT.search(value)
        if bad is None:
            return None
        what = "lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "control character"
        return f"{field or 'entry'}: {what} U+{ord(bad.group()):04X} at character {bad.start()}"
    if isinstance(value, dict):
        for key, item in value.items():
            name = f"{field}.{key}" if field else str(key)
            problem = text_problem(key, f"{name} (the key)") or text_problem(item, name)
            if problem:
                return problem
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problem = text_problem(item, f"{field}[{i}]")
            if problem:
                return problem
    return None


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


def _relative_parts(path: str, field: str) -> list[str]:
    """The parts of a relative path with ``.`` and ``..`` resolved.

    Raises:
        EntryError: the path climbs above its start (``unsafe path``) or names nothing.
    """
    parts: list[str] = []
    for part in PurePosixPath(path).parts:
        if part == "..":
            if not parts:
                raise EntryError("unsafe path", f"{field}: {path!r} escapes the dataset root")
            parts.pop()
        elif part != ".":
            parts.append(part)
    if not parts:
        raise EntryError("invalid entry", f"{field}: {path!r} names no file")
    return parts


def _not_a_feature_file(path: str, field: str) -> None:
    if PurePosixPath(path).suffix.lower() in FEATURE_EXTENSIONS:
        raise EntryError("feature file", f"{field}: {path!r} is a feature file, not a video")


def video_reference(path: str, root: str | None, field: str = "video") -> str:
    """The manifest's ``video_id`` of a video path that an entry names, relative to ``root``.

    Args:
        field: the entry's field that holds ``path``, named in the errors.

    Raises:
        EntryError: the path escapes ``root`` (``..`` or an absolute path elsewhere), or names a feature file
            (:data:`FEATURE_EXTENSIONS`: features computed elsewhere are imported, never read as a video).
    """
    _not_a_feature_file(path, field)
    if PurePosixPath(path).is_absolute():
        if root is None or not Path(path).resolve().is_relative_to(Path(root).resolve()):
            raise EntryError("unsafe path", f"{field}: absolute path {path!r} outside the dataset root {root!r}")
        path = Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    return folder_video_id(Path(*_relative_parts(path, field)))


def _marked(conversations: list[dict]) -> list[dict]:
    """Conversations of an ``<image>``-marked format with the marker written as ``<video>`` and, when there is
    exactly one, moved to the front of its turn, as LLaVA's ``preprocess_multimodal`` does (several stay where
    they are: interleaved multi-image text).

    Raises:
        EntryError: a turn already holds a literal ``<video>``: in these formats it is text, not a marker, and
            would take a visual's place.
    """
    for i, turn in enumerate(conversations):
        if VIDEO_TOKEN in turn["value"]:
            raise EntryError("invalid conversation", f"conversations[{i}].value: a literal {VIDEO_TOKEN} in a format "
                                                     f"whose visual marker is {IMAGE_TOKEN}")
    out = [{"from": t["from"], "value": t["value"].replace(IMAGE_TOKEN, VIDEO_TOKEN)} for t in conversations]
    if sum(t["value"].count(VIDEO_TOKEN) for t in out) == 1:
        for turn in out:
            if VIDEO_TOKEN in turn["value"]:
                turn["value"] = VIDEO_TOKEN + "\n" + turn["value"].replace(VIDEO_TOKEN, "").strip()
    return out


# --- reading files ------------------------------------------------------------------------------------------------

def read_text(path: str | Path) -> str:
    """A UTF-8 text file (a leading byte-order mark dropped).

    Raises:
        ValueError: the file is not UTF-8 (names the file and the byte offset of the first bad byte).
    """
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: byte offset {exc.start} ({data[exc.start:exc.start + 1]!r}: "
                         f"{exc.reason}); re-encode the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _parse_json(text: str, source: str | Path):
    """JSON with control characters allowed inside strings (they reject their entry, not the file).

    Raises:
        ValueError: not JSON (names the file, line and column).
    """
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _load_mapping(path: str | Path) -> dict:
    """A JSON object file (SSv2's ``labels.json`` / ``id2label.json``).

    Raises:
        ValueError: not UTF-8, not JSON or not an object (names the file).
    """
    data = _parse_json(read_text(path), path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass
class _Entry:
    where: str
    value: object
    error: EntryError | None = None  # a JSON Lines line that is not JSON


def _entries(source: Path, text: str | None = None) -> list[_Entry]:
    """The entries of a JSON list (``.json``) or of one JSON value per line (``.jsonl``: a line that is not JSON
    is an entry with an error, its neighbours are read).

    Raises:
        ValueError: the file is not UTF-8, or a ``.json`` file is not JSON or not a list (names the file).
    """
    text = read_text(source) if text is None else text
    if str(source).endswith(".jsonl"):
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(_Entry(f"{source} line {number}", json.loads(line, strict=False)))
            except json.JSONDecodeError as exc:
                entries.append(_Entry(f"{source} line {number}", line,
                                      EntryError("invalid entry", f"line {number}: not JSON: {exc.msg}")))
        return entries
    data = _parse_json(text, source)
    if not isinstance(data, list):
        raise ValueError(f"{source}: expected a JSON list of entries, got {type(data).__name__}")
    return [_Entry(f"{source} entry {index}", entry) for index, entry in enumerate(data)]


def _each(entries: list[_Entry], convert: Callable[[int, object], dict]) -> Iterator[Converted]:
    """``convert(index, entry)`` for every entry, after its text is checked (:func:`text_problem`); an
    :class:`EntryError` rejects that entry only. ``where`` names the entry's ``id`` when it has one."""
    for index, item in enumerate(entries):
        where, entry = item.where, item.value
        if isinstance(entry, dict) and "id" in entry:
            where += f" (id {entry['id']!r})"
        try:
            if item.error is not None:
                raise item.error
            problem = text_problem(entry)
            if problem:
                raise EntryError("invalid text", problem)
            converted = Converted(where, convert(index, entry), entry=entry)
        except EntryError as exc:
            converted = Converted(where, None, exc.kind, str(exc), entry)
        yield converted


def _reject_conflicting_answers(converted: list[Converted]) -> list[Converted]:
    """``converted`` with every record of a video that has two or more different answers in the file rejected
    (kind ``conflicting labels``): which label is right is unknowable, so none is kept. Records with the same
    answer stay (the exact repeat is rejected later as a duplicate); unanswered records take no part."""
    answers: dict[str, set[str]] = {}
    for item in converted:
        if item.record is not None and not item.record.get("unanswered"):
            answers.setdefault(item.record["video"], set()).add(item.record["conversations"][-1]["value"])
    out = []
    for item in converted:
        video = item.record["video"] if item.record is not None else None
        if video is not None and len(answers.get(video, ())) > 1 and not item.record.get("unanswered"):
            labels = sorted(answers[video])
            item = Converted(item.where, None, "conflicting labels",
                             f"id: video {video!r} has {len(labels)} different labels in this file {labels!r}; "
                             "which is right is unknowable, so every entry of it is rejected", item.entry)
        out.append(item)
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

    def convert(index: int, entry: dict) -> dict:
        _VIDEOCHATGPT(entry)
        video, question = entry["video_id"].strip(), entry["q"].strip()
        answer = entry["a"].replace(NOISE, "").strip()
        after = {"alternate": index % 2 == 0, "after": True, "before": False}[options.video_placement]
        prompt = f"{question}\n{VIDEO_TOKEN}" if after else f"{VIDEO_TOKEN}\n{question}"
        n = per_video[video] = per_video.get(video, -1) + 1
        return {"id": f"{video}_{n}", "video": video, "conversations": [
            {"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]}

    yield from _each(_entries(source), convert)


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

    def convert(index: int, entry: dict) -> dict:
        _VIDEOLLAMA(entry)
        video = video_reference(entry["video"], options.root)
        turns = []
        for i, pair in enumerate(entry["QA"]):
            question = pair["q"].strip()
            turns += [{"from": "human", "value": f"{VIDEO_TOKEN}\n{question}" if i == 0 else question},
                      {"from": "gpt", "value": pair["a"].strip()}]
        return {"id": f"{video}_{index}", "video": video, "video_path": entry["video"], "conversations": turns}

    yield from _each(_entries(source), convert)


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
    A file name that is not UTF-8 (a lone surrogate in Python's reading of it) rejects its record.
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
        digest = int(hashlib.sha1(f"{options.seed}:{relative.as_posix()}".encode(errors="surrogateescape"))
                     .hexdigest(), 16)
        question = ACTION_QUESTIONS[digest % len(ACTION_QUESTIONS)]
        video = folder_video_id(relative)
        yield Converted(where, {"id": video, "video": video, "video_path": relative.as_posix(), "conversations": [
            {"from": "human", "value": f"{VIDEO_TOKEN}\n{question}"},
            {"from": "gpt", "value": readable_class(label)}]}, entry=relative.as_posix())


# --- Something-Something-v2 ---------------------------------------------------------------------------------------

_SLOT = re.compile(r"\[[^\]]+\]")
_SSV2 = _checked({
    "type": "object", "required": ["id"],
    "properties": {"id": {"type": ["string", "integer"]}, "template": {"type": "string", "minLength": 1},
                   "label": {"type": "string"},
                   "placeholders": {"type": "array", "items": {"type": "string", "minLength": 1}}},
})
SSV2_QUESTION = "Describe this video."


def ssv2_answer(template: str, placeholders: list[str] | None) -> str:
    """An SSv2 class template with its ``[slots]`` filled by the video's placeholders in order (``Putting [something]
    on [something]`` + ``["a pen", "a book"]`` -> ``Putting a pen on a book``); with ``placeholders`` None, the
    class itself, brackets removed (``Putting something on something``: the LLaVA fork's answer).

    Raises:
        EntryError: the placeholders are not one per slot (kind ``placeholder mismatch``): which object goes where
            is unknown, and the class alone would be a different answer than the annotation gives.
    """
    if placeholders is None:
        return template.replace("[", "").replace("]", "")
    slots = _SLOT.findall(template)
    if len(placeholders) != len(slots):
        raise EntryError("placeholder mismatch", f"placeholders: {len(placeholders)} placeholder(s) {placeholders!r} "
                                                 f"for the {len(slots)} slot(s) of {template!r}")
    filled = iter(placeholders)
    return _SLOT.sub(lambda _: next(filled), template)


def _ssv2_record(video: str, answer: str | None) -> dict:
    """A record of one SSv2 video; ``answer`` None gives an unanswered (question-only) record."""
    question = {"from": "human", "value": f"{VIDEO_TOKEN}\n{SSV2_QUESTION}"}
    if answer is None:
        return {"id": video, "video": video, "conversations": [question], "unanswered": True}
    return {"id": video, "video": video, "conversations": [question, {"from": "gpt", "value": answer}]}


def ssv2(source: Path, options: Options) -> Iterator[Converted]:
    """Something-Something-v2's official ``something-something-v2-{train,validation,test}.json``.

    Train and validation entries are ``{"id", "label", "template", "placeholders"}``: the answer is
    :func:`ssv2_answer` (the template's slots filled with the placeholders; a count that does not match rejects the
    entry), checked against ``labels.json`` (template without brackets -> class index) when ``labels`` is given.
    Test entries are ``{"id"}`` alone: they become unanswered records (the question, no answer), which go to the val
    split and are evaluated without a score. The question is "Describe this video." (the LLaVA video fork's).
    A video id that appears with different answers rejects all its entries (:func:`_reject_conflicting_answers`).
    """
    classes = _load_mapping(options.labels) if options.labels else None

    def convert(index: int, entry: dict) -> dict:
        _SSV2(entry)
        video = str(entry["id"])
        if "template" not in entry:
            extra = sorted({"label", "placeholders"} & set(entry))
            if extra:
                raise EntryError("invalid entry", f"template: missing, though the entry has {', '.join(extra)}")
            return _ssv2_record(video, None)
        template = entry["template"]
        if classes is not None and template.replace("[", "").replace("]", "") not in classes:
            raise EntryError("unknown label", f"template: {template!r} is not in {options.labels}")
        return _ssv2_record(video, ssv2_answer(template, entry.get("placeholders", [])))

    yield from _reject_conflicting_answers(list(_each(_entries(source), convert)))


def _fork_video_id(path: str, root: str | None) -> str:
    """The video id of an SSv2 fork csv path: :func:`video_reference` under ``root``; without one, the file's stem
    (SSv2's numeric id), after the same checks (no feature file, no relative path climbing out with ``..``)."""
    if root:
        return video_reference(path, root)
    _not_a_feature_file(path, "path")
    name = PurePosixPath(path).name if PurePosixPath(path).is_absolute() else _relative_parts(path, "path")[-1]
    return folder_video_id(Path(name))


def ssv2_fork(source: Path, options: Options) -> Iterator[Converted]:
    """The LLaVA video fork's SSv2 layout (SeHwanJoo/LLaVA ``scripts/dataset/convert2instruct.py``): ``train.csv``
    lines ``<path> <class index>`` separated by spaces (VideoMAE's lists) and ``id2label.json`` (class index ->
    template). The video id is the file's stem (:func:`_fork_video_id`); the answer is the template without
    brackets (the fork keeps them). A video listed under two classes rejects all its lines.

    Raises:
        ValueError: the csv or ``id2label.json`` is not UTF-8 or the latter not a JSON object (names the file).
    """
    if not options.labels:
        yield Converted(str(source), None, "invalid entry", "ssv2_fork needs labels: the id2label.json file")
        return
    id2label = _load_mapping(options.labels)
    lines = [_Entry(f"{source} line {number}", line)
             for number, line in enumerate(read_text(source).splitlines(), start=1) if line.strip()]

    def convert(index: int, line: str) -> dict:
        parts = line.split()
        if len(parts) != 2:
            raise EntryError("invalid entry", f"line: expected '<path> <label>', got {line.strip()!r}")
        path, label = parts
        if label not in id2label:
            raise EntryError("unknown label", f"label: {label!r} is not in {options.labels}")
        return _ssv2_record(_fork_video_id(path, options.root), ssv2_answer(id2label[label], None))

    yield from _reject_conflicting_answers(list(_each(lines, convert)))


# --- LLaVA, LLaVA-NeXT, LLaMA-VID ---------------------------------------------------------------------------------

_LLAVA = _checked({
    "type": "object", "required": ["conversations"],
    "properties": {
        "id": {"type": ["string", "integer"]},  # LLaMA-VID's WebVid ids are JSON integers
        "image": {"anyOf": [{"type": "string", "minLength": 1},
                            {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}]},
        "video": {"type": "string", "minLength": 1},
        "conversations": {"type": "array", "minItems": 2, "items": {
            "type": "object", "required": ["from", "value"],
            "properties": {"from": {"enum": ["human", "gpt"]}, "value": {"type": "string"}}}},
    },
})


def llava(source: Path, options: Options) -> Iterator[Converted]:
    """LLaVA, LLaVA-NeXT and LLaMA-VID conversation files as published: ``{"id", "image" | "video",
    "conversations"}``, multi-turn, the visual input marked ``<image>`` (videos too).

    - ``video``: one video, its marker moved to the front of its turn, as LLaVA's ``preprocess_multimodal`` does.
    - ``image``: a path or, in LLaVA-NeXT, a list of paths with one ``<image>`` per image in the text
      (``llava/train/train.py`` ``_get_item``); a list of two or more becomes ``videos``, marker i taking image i.
      Image records are kept or dropped by ``images`` and counted either way.
    - neither: a text-only record (LLaVA-665K trains on ShareGPT's), kept as it is.

    Rejected: an entry with both ``image`` and ``video`` (E.T. Chat asserts there is never both; LLaVA-NeXT would
    silently take the image), a path to a feature file, and a literal ``<video>`` in the text (:func:`_marked`);
    marker counts that do not match the visuals are rejected by the record checks.
    """

    def convert(index: int, entry: dict) -> dict:
        _LLAVA(entry)
        if "image" in entry and "video" in entry:
            raise EntryError("invalid entry", "image, video: the entry names both an image and a video")
        record = {"id": str(entry.get("id", index)), "conversations": _marked(entry["conversations"])}
        if "video" in entry:
            record.update(video=video_reference(entry["video"], options.root), video_path=entry["video"])
        elif "image" in entry:
            if options.images != "keep":
                raise EntryError("image record (dropped)", "image: image records are dropped (images: drop)")
            if isinstance(entry["image"], str):
                record.update(video=video_reference(entry["image"], options.root, "image"),
                              video_path=entry["image"])
            elif len(entry["image"]) == 1:
                record.update(video=video_reference(entry["image"][0], options.root, "image[0]"),
                              video_path=entry["image"][0])
            else:
                record.update(videos=[video_reference(path, options.root, f"image[{i}]")
                                      for i, path in enumerate(entry["image"])], video_paths=entry["image"])
            record["modality"] = "image"
        return record

    yield from _each(_entries(source), convert)


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
_SEGMENT_JOIN = re.compile(r"\s*(?:-|–|to)\s*")  # what joins a segment's start and end: '12s - 18s', 'from 5s to 9s'
_TEXT_SEGMENT = re.compile(  # a segment written in numbers: '36.0 - 44.0 seconds', '12s - 18s', '5.0s to 9.5s'
    r"(?<![\d.])(\d+(?:\.\d+)?)\s*s?\s*(?:-|–|\bto\b)\s*(\d+(?:\.\d+)?)\s*(?:s\b|sec(?:ond)?s?\b)")


def render_timestamp(seconds: float) -> str:
    """A timestamp as E.T. Chat writes it in text (``--use_time_tag``: ``'{}s'.format(round(s, 1))``: ``12s`` for
    an integer, ``12.5s`` for a float)."""
    return f"{round(seconds, 1)}s"


def _rendered_turn(i: int, turn: dict, stamps: list[float], name: str, first: int) -> dict:
    """A ``<vid>`` turn with its timestamps written in, after checking its segments: two ``<vid>`` joined by
    ``-`` or ``to`` are a segment's start and end (``<vid> - <vid> seconds``, ``from <vid> to <vid>``).

    Args:
        stamps: the turn's values, one per ``<vid>`` in order; ``stamps[k]`` is ``<name>[first + k]``.

    Raises:
        EntryError: a segment ends before it starts (kind ``segment ends before it starts``).
    """
    parts = turn["value"].split(MATCH_TOKEN)  # parts[k] lies between <vid> number k - 1 and number k
    k = 1
    while k < len(parts) - 1:
        if _SEGMENT_JOIN.fullmatch(parts[k]):
            start, end = stamps[k - 1], stamps[k]
            if end < start:
                raise EntryError("segment ends before it starts",
                                 f"{name}[{first + k - 1}], {name}[{first + k}]: the segment of conversations[{i}] "
                                 f"ends at {end} s, before it starts at {start} s")
            k += 1
        k += 1
    text = parts[0]
    for stamp, part in zip(stamps, parts[1:]):
        text += render_timestamp(stamp) + part
    return {"from": turn["from"], "value": text}


def _check_text_segments(turns: list[dict]) -> None:
    """Segments written as numbers (``36.0 - 44.0 seconds``, ``12s - 18s``, ``5.0s to 9.5s``).

    Raises:
        EntryError: a segment ends before it starts.
    """
    for i, turn in enumerate(turns):
        for match in _TEXT_SEGMENT.finditer(turn["value"]):
            start, end = float(match.group(1)), float(match.group(2))
            if end < start:
                raise EntryError("segment ends before it starts", f"conversations[{i}].value: the segment "
                                                                  f"{match.group(0)!r} ends before it starts")


def etchat(source: Path, options: Options) -> Iterator[Converted]:
    """E.T. Instruct 164K (E.T. Bench ``docs/DATASET.md``): ``{"task", "source", "video", "duration", "src",
    "tgt", "conversations"}``, in either of the two files E.T. Chat ships.

    - ``et_instruct_164k_vid.json``: every timestamp in the text is a ``<vid>`` token and its value in seconds is
      in ``src`` (human turns) or ``tgt`` (gpt turns), in order; they are written into the text as E.T. Chat writes
      them (:func:`render_timestamp`), or kept as tokens (``Options.timestamps`` ``tokens``: the matching head's
      input). A count of ``<vid>`` that does not match ``src`` + ``tgt`` is rejected.
    - ``et_instruct_164k_txt.json`` (for models that write timestamps as text, ``2.5 - 4.8 seconds``): the text
      already holds the timestamps and is kept as it is.

    The file is the ``vid`` kind when its text holds ``<vid>`` anywhere, else the ``txt`` kind. Either way ``src``
    and ``tgt`` are kept as the record's ``timestamps``, with ``duration``; a timestamp outside ``[0, duration]``
    (which E.T. Chat clamps silently) or a segment that ends before it starts is a rejected entry. A segment is
    a start and an end joined by ``-`` or ``to``: E.T. Instruct writes spans as ``<start> - <end> seconds`` (flat
    ``tgt`` pairs ``[s1, e1, s2, e2, ...]`` for grounding, localisation and dense captioning), and E.T. Bench's
    ``compute_metrics.py`` reads ``a - b`` as ``[start, end]``.
    """
    text = read_text(source)
    timestamps_as_tokens = MATCH_TOKEN in text

    def convert(index: int, entry: dict) -> dict:
        _ETCHAT(entry)
        src, tgt, duration = entry.get("src", []), entry.get("tgt", []), float(entry["duration"])
        for name, values in (("src", src), ("tgt", tgt)):
            outside = [t for t in values if not 0 <= t <= duration]
            if outside:
                raise EntryError("timestamp outside the video",
                                 f"{name}: {outside[0]} s outside the video's {duration} s")
        turns = _marked(entry["conversations"])
        if timestamps_as_tokens:
            values, used = {"human": ("src", src), "gpt": ("tgt", tgt)}, {"src": 0, "tgt": 0}
            rendered = []
            for i, turn in enumerate(turns):
                name, stamps = values[turn["from"]]
                count = turn["value"].count(MATCH_TOKEN)
                if used[name] + count > len(stamps):
                    raise EntryError("invalid entry", f"conversations: more {MATCH_TOKEN} than src/tgt timestamps")
                rendered.append(_rendered_turn(i, turn, stamps[used[name]:used[name] + count], name, used[name]))
                used[name] += count
            if used["src"] < len(src) or used["tgt"] < len(tgt):
                raise EntryError("invalid entry", f"src/tgt: more timestamps than {MATCH_TOKEN} tokens")
            if options.timestamps == "text":
                turns = rendered
        else:
            _check_text_segments(turns)
        return {"id": f"{entry.get('source', 'et')}_{index}", "video": video_reference(entry["video"], options.root),
                "video_path": entry["video"], "conversations": turns, "timestamps": {"src": src, "tgt": tgt},
                "duration": duration, "task": entry.get("task", "")}

    yield from _each(_entries(source, text), convert)


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
