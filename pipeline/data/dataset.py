"""Training samples: instruction records + their visuals -> token ids, labels and the visuals' inputs.

A record names zero, one or several visuals (:func:`pipeline.data.formats.visuals`). Where a visual's inputs come
from is a *visual source*: :class:`CachedVisuals` (the features rule's tokens, a stage with ``vision: cached``) or
:class:`pipeline.data.frames.OnlineVisuals` (frames decoded from the compressed videos in DataLoader workers, the
tower running in the training step). Each ``<video>`` marker of a conversation takes its visual's n positions, n as
the connector says (:meth:`pipeline.model.connectors.base.Connector.num_tokens`), in marker order; a text-only
record has no marker and an empty visual input, so every batch has one (the connector then stays in the graph of
every step, as DDP and ZeRO expect of a trained parameter).

:func:`fit_records` checks once, before training, that every sample's mask can be built exactly within the length
limit; the dataset then tokenizes lazily, per ``__getitem__``. A visual that cannot be read at training time (a
video whose frames do not decode) is skipped with its reason (:class:`InstructionDataset`), never a crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline import IGNORE_INDEX, VIDEO_TOKEN
from pipeline.data.formats import visuals
from pipeline.data.templates import Template, tokenize_conversation
from pipeline.features.store import FeatureStore
from pipeline.io import read_json, read_table
from pipeline.shards import ItemError


@dataclass(frozen=True)
class VisualInfo:
    """What a visual gives the connector, known before it is loaded.

    Attributes:
        frames: T, frames of tokens (0 when the rows are not per frame: Video-ChatGPT's pooled rows).
        patches: S, tokens a frame (for pooled rows: the spatial rows).
        rows: N, the rows of the visual's tokens.
        sampled: frames sampled from the video.
        duration: the video's length in seconds (0 when unknown).
        times: each output frame's time in the video, seconds (empty when unknown).
    """

    frames: int
    patches: int
    rows: int
    sampled: int
    duration: float
    times: tuple[float, ...] = ()

    def frame_at(self, seconds: float) -> int:
        """The index of the frame nearest to ``seconds``, a tie to the even index: at E.T. Chat's 1 fps from t = 0
        the frame of ``torch.round(seconds)``, half to even (``etchat_arch.py:247``).

        Raises:
            ValueError: the frames' times are unknown.
        """
        if not self.times:
            raise ValueError("the frames' times are unknown")
        return min(range(len(self.times)), key=lambda i: (round(abs(self.times[i] - seconds), 6), i % 2))


class CachedVisuals:
    """Visuals from the features store (``vision: cached``).

    Args:
        store: the :class:`FeatureStore`.
        max_frames: see :meth:`FeatureStore.get`.
    """

    def __init__(self, store: FeatureStore, max_frames: int | None = None):
        self.store, self.max_frames = store, max_frames
        table = read_table(store.index)
        self.durations = {video: float(d or 0) for video, d in zip(table["video_id"], table.get("duration", []))}

    @property
    def dim(self) -> int:
        """D, the width of the tokens."""
        return self.store.dim

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.store

    def info(self, video_id: str) -> VisualInfo:
        """The :class:`VisualInfo` of ``video_id``.

        Raises:
            KeyError: not in the store.
        """
        rows = self.store.rows(video_id, self.max_frames)
        layout = self.store.info(video_id)
        per_frame = layout["layout"] == "frames"
        frames = rows // layout["S"] if per_frame else 0
        times = [float(t) for t in layout["frame_times"]]
        if per_frame and frames < len(times):  # max_frames kept these, evenly spaced (FeatureStore.get)
            times = [times[i] for i in np.round(np.linspace(0, len(times) - 1, frames)).astype(int)]
        return VisualInfo(frames, layout["S"], rows, frames if per_frame else layout["T"],
                          self.durations.get(video_id, 0.0), tuple(times) if per_frame else ())

    def load(self, video_id: str) -> dict:
        """``{"video_features": (N, D) float16, "layout": (T, S)}`` of ``video_id``."""
        info = self.info(video_id)
        return {"video_features": torch.from_numpy(self.store.get(video_id, self.max_frames)),
                "layout": (info.frames, info.patches)}


def visual_tokens(source, records: list[dict], connector) -> dict[str, int]:
    """``video_id -> n``, the LLM positions of every visual ``records`` name that ``source`` holds: the
    ``video_tokens`` of :func:`fit_records`.

    Args:
        source: a visual source (:class:`CachedVisuals`, :class:`pipeline.data.frames.OnlineVisuals`).
        connector: the stage's connector (its :meth:`num_tokens`).
    """
    names = {video for record in records for video in visuals(record)}
    counts = {}
    for video in names:
        if video in source:
            info = source.info(video)
            counts[video] = connector.num_tokens(info.frames, info.patches, info.rows)
    return counts


def frame_times_text(times: tuple[float, ...]) -> str:
    """The frames' times as Video-LLaMA writes them in its prompt: ``"0.0, 1.2, 2.5"`` (seconds, one decimal)."""
    return ", ".join(f"{t:.1f}" for t in times)


def with_video_prompt(record: dict, prompt: str | None, infos: list[VisualInfo]) -> list[dict]:
    """The record's conversation with ``prompt`` (``{duration}`` in seconds, ``{frames}`` sampled, ``{times}`` the
    frames' times, :func:`frame_times_text`) put right after each video's ``<video>`` marker (VideoChat-Flash
    ``llava/train/train.py`` ``preprocess_multimodal``: ``<image>`` + ``"\\nThe video lasts for 12.34 seconds, and
    64 frames are uniformly sampled from it. "``, then the question after its newline). Image records get none, as
    there."""
    turns = record["conversations"]
    if not prompt or record.get("modality") == "image" or not infos:
        return turns
    texts = iter(prompt.format(duration=info.duration, frames=info.sampled, times=frame_times_text(info.times))
                 for info in infos)
    out = []
    for turn in turns:
        value = turn["value"]
        if VIDEO_TOKEN in value:
            parts = value.split(VIDEO_TOKEN)
            value = parts[0] + "".join(VIDEO_TOKEN + next(texts) + part for part in parts[1:])
        out.append({**turn, "value": value})
    return out


def filter_records(records: list[dict], source, min_duration: float | None = None,
                   max_duration: float | None = None, max_answer_words: int | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """The records a stage's filters keep, and the ones they drop with the reason (E.T. Chat
    ``etchat/train/train.py:284-295``: a record whose video lasts less than ``min_duration`` or more than
    ``max_duration`` seconds, or whose first answer has more than ``max_answer_words`` words, ``split(' ')``).

    The duration is the record's ``duration`` (the annotation's, as there), else its video's (``source.info``);
    a record with neither (text only) is not filtered by duration.

    Returns:
        ``(kept, excluded)``; an excluded record is ``{"id", "video", "reason"}``.
    """
    kept, excluded = [], []
    for record in records:
        names = visuals(record)
        duration = record.get("duration")
        if duration is None and names and names[0] in source:
            duration = source.info(names[0]).duration or None
        answers = [turn["value"] for turn in record["conversations"] if turn["from"] == "gpt"]
        words = len(answers[0].split(" ")) if answers else 0
        reason = None
        if duration is not None and min_duration is not None and duration < min_duration:
            reason = f"duration: the video lasts {duration} s, less than min_duration {min_duration} s"
        elif duration is not None and max_duration is not None and duration > max_duration:
            reason = f"duration: the video lasts {duration} s, more than max_duration {max_duration} s"
        elif max_answer_words is not None and words > max_answer_words:
            reason = f"conversations: the first answer has {words} words, more than max_answer_words {max_answer_words}"
        if reason:
            excluded.append({"id": record["id"], "video": record.get("video"), "reason": reason})
        else:
            kept.append(record)
    return kept, excluded


def fit_records(records: list[dict], tokenizer, template: Template, max_length: int,
                video_tokens: dict[str, int], video_wrap: tuple[int, int] | None = None,
                source=None, video_prompt: str | None = None) -> tuple[list[dict], list[dict]]:
    """The records as they fit in ``max_length`` tokens, and the ones that cannot, with the reason.

    A record longer than ``max_length`` loses whole trailing question/answer pairs until it fits (its kept
    answers stay complete: no answer is ever cut, no sample trains on nothing), never a turn that holds a
    ``<video>`` marker (its visual would lose its place). A record whose visuals and first answer alone do not
    fit, that the template cannot render exactly, that names a visual without features, or that is unanswered
    (nothing to train on) is excluded.

    Args:
        video_tokens: ``video_id -> n``, each visual's LLM positions (:func:`visual_tokens`).
        video_wrap: see :func:`tokenize_conversation`.
        source, video_prompt: with a prompt, the visual source whose :meth:`info` fills it in
            (:func:`with_video_prompt`).

    Returns:
        ``(kept, excluded)``; a shortened record gets ``"dropped_turns"``, an excluded one is
        ``{"id", "video", "reason"}`` (``video``: the record's, None for text-only and multi-image records).
    """
    kept, excluded = [], []
    for record in records:
        try:
            if record.get("unanswered"):
                raise ValueError("unanswered: no reference answer to train on")
            rows = [video_tokens[video] for video in visuals(record)]
            infos = [source.info(video) for video in visuals(record)] if video_prompt else []
            turns = with_video_prompt(record, video_prompt, infos)
            marked = [i for i, turn in enumerate(turns) if VIDEO_TOKEN in turn["value"]]
            shortest = max(marked, default=0) + 2 - max(marked, default=0) % 2  # through the last marker's answer
            for end in range(len(turns), shortest - 1, -2):
                ids, _ = tokenize_conversation(turns[:end], tokenizer, template, rows, video_wrap=video_wrap)
                if len(ids) <= max_length:
                    whole = end == len(turns)
                    kept.append(record if whole else {**record, "conversations": record["conversations"][:end],
                                                      "dropped_turns": len(turns) - end})
                    break
            else:
                raise ValueError(f"the visuals ({sum(rows)} tokens) and the answers through the last one need "
                                 f"{len(ids)} tokens, more than max_length {max_length}")
        except (KeyError, ValueError) as exc:
            reason = f"no features for {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            excluded.append({"id": record["id"], "video": record.get("video"), "reason": reason})
    return kept, excluded


class InstructionDataset(Dataset):
    """LLaVA conversation records with their visuals' inputs.

    Each item is ``{"id", "input_ids": (L,) int64, "labels": (L,) int64, "layouts": [(T, S), ...]}`` and, from
    a :class:`CachedVisuals` source, ``"video_features": (sum N, D) float16`` (``(0, D)`` for a text-only record),
    or from an online one ``"pixel_values": (sum T, 3, H, W) uint8`` with ``"frames": [T, ...]``. The positions of
    ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the connector's output for the visuals, in marker order.

    A record whose visual cannot be loaded (:class:`~pipeline.shards.ItemError`: a video that does not decode, or
    decodes to more tokens than its record was fitted for) is skipped: the next record takes its place in the
    batch, and ``{"id", "video", "reason"}`` is appended to ``skipped`` (a JSON-lines file, written from the
    DataLoader workers), which the stage lists in its ``excluded.jsonl``.

    Args:
        records: records that fit ``max_length`` (:func:`fit_records`), or their JSON file.
        source: the visual source.
        connector: the stage's connector (its ``num_tokens``).
        max_length: longest sequence in tokens.
        video_wrap: see :func:`tokenize_conversation`.
        video_prompt: see :func:`with_video_prompt`.
        skipped: where skipped records are listed; None: not listed.
        query_tokenizer: a question-conditioned connector's tokenizer
            (:func:`pipeline.model.qformer.qformer_tokenizer`): each item gets ``query_ids``, the record's first
            question (its ``<video>`` marker removed, as E.T. Chat ``etchat/train/train.py:93``) once per visual.
        match_token_id: with matching, the id of ``<vid>``: each item gets ``vid_frames`` ``(M,)`` int64, the
            frame nearest to the time of each ``<vid>`` of ``input_ids`` (the record's ``timestamps``: ``src`` in
            the questions', ``tgt`` in the answers', in order).
    """

    def __init__(self, records: list[dict] | str | Path, tokenizer, template: Template, source, connector,
                 max_length: int, video_wrap: tuple[int, int] | None = None, video_prompt: str | None = None,
                 skipped: str | Path | None = None, query_tokenizer=None, match_token_id: int | None = None):
        self.records = read_json(records) if isinstance(records, (str, Path)) else records
        self.tokenizer, self.template, self.source, self.max_length = tokenizer, template, source, max_length
        self.connector, self.video_wrap, self.video_prompt, self.skipped = connector, video_wrap, video_prompt, skipped
        self.query_tokenizer, self.match_token_id = query_tokenizer, match_token_id

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        """Load and tokenize record ``index`` (or, when its visual cannot be loaded, the next loadable one).

        Raises:
            ItemError: no record of the dataset can be loaded.
        """
        for step in range(len(self.records)):
            record = self.records[(index + step) % len(self.records)]
            try:
                return self.item(record)
            except ItemError as exc:
                if self.skipped is not None:
                    with open(self.skipped, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"id": record["id"], "video": record.get("video"),
                                                 "reason": f"at training time: {exc}"}, ensure_ascii=False) + "\n")
        raise ItemError("no record's visuals could be loaded")

    def item(self, record: dict, for_generation: bool = False) -> dict:
        """Load and tokenize one record (``for_generation``: as a prompt, without its last answer).

        Raises:
            ItemError: a visual cannot be loaded, or gives more tokens than ``max_length`` leaves room for.
        """
        names = visuals(record)
        loaded = [self.source.load(video) for video in names]
        infos = [self.source.info(video) for video in names] if self.video_prompt or self.match_token_id else []
        layouts = [item["layout"] for item in loaded]
        rows = [self.connector.num_tokens(t, s, t * s if t else self._rows(item)) for item, (t, s)
                in zip(loaded, layouts)]
        ids, labels = tokenize_conversation(with_video_prompt(record, self.video_prompt, infos), self.tokenizer,
                                            self.template, rows, for_generation=for_generation,
                                            video_wrap=self.video_wrap)
        if len(ids) > self.max_length:
            raise ItemError(f"{len(ids)} tokens > max_length {self.max_length} (its video decoded to more frames "
                            "than its probe said)")
        sample = {"id": record["id"], "input_ids": torch.tensor(ids, dtype=torch.long),
                  "labels": torch.tensor(labels, dtype=torch.long), "layouts": layouts}
        if self.query_tokenizer is not None:
            sample["query_ids"] = [self._query(record)] * len(names)
        if self.match_token_id is not None:
            sample["vid_frames"] = self._vid_frames(record, sample["input_ids"], infos, for_generation)
        if isinstance(getattr(self.source, "source", self.source), CachedVisuals):  # a wrapped source too
            parts = [item["video_features"] for item in loaded]
            sample["video_features"] = torch.cat(parts) if parts else torch.zeros((0, self.source.dim),
                                                                                  dtype=torch.float16)
        else:
            parts = [item["pixel_values"] for item in loaded]
            sample["pixel_values"] = torch.cat(parts) if parts else self.source.empty()
            sample["frames"] = [len(part) for part in parts]
        return sample

    @staticmethod
    def _rows(item: dict) -> int:
        return len(item["video_features"])

    def _query(self, record: dict) -> list[int]:
        from pipeline.model.qformer import QUERY_MAX_LENGTH

        question = record["conversations"][0]["value"].replace(VIDEO_TOKEN, "").strip()
        return self.query_tokenizer(question, truncation=True, max_length=QUERY_MAX_LENGTH)["input_ids"]

    def _vid_frames(self, record: dict, input_ids: torch.Tensor, infos: list[VisualInfo],
                    for_generation: bool) -> torch.Tensor:
        """The frame of each ``<vid>`` of ``input_ids``, in order.

        Raises:
            ItemError: the ``<vid>`` tokens and the record's timestamps do not pair up, or the frames' times are
                unknown.
        """
        from pipeline.model.matching import MATCH_TOKEN

        turns = record["conversations"][:-1] if for_generation and record["conversations"][-1]["from"] == "gpt" \
            else record["conversations"]
        stamps = record.get("timestamps") or {}
        queues = {"human": list(stamps.get("src") or []), "gpt": list(stamps.get("tgt") or [])}
        seconds = []
        for i, turn in enumerate(turns):
            count = turn["value"].count(MATCH_TOKEN)
            if count > len(queues[turn["from"]]):
                raise ItemError(f"{record['id']}: conversations[{i}] has more {MATCH_TOKEN} than timestamps")
            seconds += queues[turn["from"]][:count]
            del queues[turn["from"]][:count]
        found = int((input_ids == self.match_token_id).sum())
        if found != len(seconds):
            raise ItemError(f"{record['id']}: {found} {MATCH_TOKEN} tokens in its ids, {len(seconds)} in its text")
        if seconds and (not infos or not infos[0].times):
            raise ItemError(f"{record['id']}: {MATCH_TOKEN} timestamps need the frames' times of its video")
        try:
            return torch.tensor([infos[0].frame_at(t) for t in seconds], dtype=torch.long)
        except ValueError as exc:
            raise ItemError(f"{record['id']}: {exc}") from exc


class VideoCollator:
    """Pads a batch on the right: ``input_ids`` with ``pad_token_id``, ``labels`` with ``IGNORE_INDEX``; or with
    ``packing``, packs it padding-free into one row.

    Returns ``input_ids`` ``(B, L)``, ``labels`` ``(B, L)``, ``attention_mask`` ``(B, L)`` int64, the visuals'
    layouts ``visual_layout`` ``(K, 2)`` int64 (each visual's ``(T, S)``, in batch order), and either
    ``video_features`` ``(sum N_i, D)`` (every sample's rows, concatenated in batch order; ``(0, D)`` for a batch of
    text-only samples) or ``pixel_values`` ``(sum T_i, 3, H, W)`` uint8 with ``visual_frames`` ``(K,)`` int64. With
    ``trace`` it appends each batch's record ids to that file (one line a batch: the data order, to check a resumed
    run against an uninterrupted one).

    Packed (``packing``), as transformers' ``DataCollatorWithFlattening``: ``input_ids`` and ``labels`` ``(1, sum
    L_i)`` int64, the samples' tokens one after the other (video positions included: they are already expanded to
    the connector's tokens), and ``position_ids`` ``(1, sum L_i)`` int64, counting from 0 in each sample, in place
    of ``attention_mask``. Each sample's first label is ``IGNORE_INDEX``, so that the last token of a sample does
    not learn to predict the next sample (unpacked, the first label is never a target). Given ``position_ids`` and
    no ``attention_mask``, the LLM keeps attention within each sample: flash-attn's varlen kernel, or a
    block-diagonal causal mask (SDPA, eager).
    """

    def __init__(self, pad_token_id: int, trace: str | Path | None = None, packing: bool = False):
        self.pad_token_id, self.trace, self.packing = pad_token_id, trace, packing

    def __call__(self, batch: list[dict]) -> dict:
        if self.trace is not None:
            with open(self.trace, "a", encoding="utf-8") as handle:
                handle.write(" ".join(item["id"] for item in batch) + "\n")
        layouts = [layout for item in batch for layout in item["layouts"]]
        out = self._packed(batch) if self.packing else self._padded(batch)
        out["visual_layout"] = torch.tensor(layouts, dtype=torch.long).reshape(-1, 2)
        if "query_ids" in batch[0]:  # one question per visual, padded on the right with 0 ([PAD])
            queries = [ids for item in batch for ids in item["query_ids"]]
            width = max(map(len, queries), default=0)
            out["query_input_ids"] = torch.zeros((len(queries), width), dtype=torch.long)
            out["query_attention_mask"] = torch.zeros((len(queries), width), dtype=torch.long)
            for i, ids in enumerate(queries):
                out["query_input_ids"][i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                out["query_attention_mask"][i, :len(ids)] = 1
        if "vid_frames" in batch[0]:
            out["vid_frames"] = torch.cat([item["vid_frames"] for item in batch])
        if "pixel_values" in batch[0]:
            out["pixel_values"] = torch.cat([item["pixel_values"] for item in batch])
            out["visual_frames"] = torch.tensor([t for item in batch for t in item["frames"]], dtype=torch.long)
        else:
            out["video_features"] = torch.cat([item["video_features"] for item in batch])
        return out

    def _padded(self, batch: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = item["input_ids"], item["labels"], 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    @staticmethod
    def _packed(batch: list[dict]) -> dict:
        lengths = [len(item["input_ids"]) for item in batch]
        labels = torch.cat([item["labels"] for item in batch])
        labels[torch.tensor([0, *lengths[:-1]]).cumsum(0)] = IGNORE_INDEX  # each sample's first position
        return {"input_ids": torch.cat([item["input_ids"] for item in batch])[None], "labels": labels[None],
                "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
