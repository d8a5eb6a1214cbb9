"""Training samples: instruction records + cached video features -> token ids, labels and feature rows.

:func:`fit_records` checks once, before training, that every sample's mask can be built exactly within the length
limit; the dataset then tokenizes lazily, per ``__getitem__``.

A record names zero, one or several visuals (:func:`pipeline.data.formats.visuals`): each ``<video>`` marker of
its conversation takes the feature rows of its visual, in marker order; a text-only record has no marker and no
rows, and its sample carries a ``(0, D)`` feature tensor, so every batch has one (the projector then stays in the
graph of every step, as DDP and ZeRO expect of a trained parameter).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline import IGNORE_INDEX, VIDEO_TOKEN
from pipeline.data.formats import visuals
from pipeline.data.templates import Template, tokenize_conversation
from pipeline.features.store import FeatureStore
from pipeline.io import read_json


def visual_rows(store: FeatureStore, records: list[dict], max_frames: int | None = None) -> dict[str, int]:
    """``video_id -> N`` (:meth:`FeatureStore.rows` with ``max_frames``) of every visual ``records`` name that has
    features: the ``video_tokens`` of :func:`fit_records`."""
    names = {video for record in records for video in visuals(record)}
    return {video: store.rows(video, max_frames) for video in names if video in store}


def record_features(record: dict, store: FeatureStore, dim: int, max_frames: int | None = None
                    ) -> tuple[torch.Tensor, list[int]]:
    """The feature rows of the visuals ``record`` names, concatenated in marker order, and each visual's row count.

    Args:
        dim: D, the width of a text-only record's empty tensor.
        max_frames: see :meth:`FeatureStore.get`.

    Returns:
        ``(sum N_i, D)`` float16 (``(0, dim)`` for a text-only record) and ``[N_1, ...]``, the
        ``num_video_tokens`` of :func:`tokenize_conversation`.

    Raises:
        KeyError: a visual is not in the store.
    """
    parts = [torch.from_numpy(store.get(video, max_frames)) for video in visuals(record)]
    if not parts:
        return torch.zeros((0, dim), dtype=torch.float16), []
    return torch.cat(parts), [len(part) for part in parts]


def fit_records(records: list[dict], tokenizer, template: Template, max_length: int,
                video_tokens: dict[str, int], video_wrap: tuple[int, int] | None = None
                ) -> tuple[list[dict], list[dict]]:
    """The records as they fit in ``max_length`` tokens, and the ones that cannot, with the reason.

    A record longer than ``max_length`` loses whole trailing question/answer pairs until it fits (its kept
    answers stay complete: no answer is ever cut, no sample trains on nothing), never a turn that holds a
    ``<video>`` marker (its visual would lose its place). A record whose visuals and first answer alone do not
    fit, that the template cannot render exactly, that names a visual without features, or that is unanswered
    (nothing to train on) is excluded.

    Args:
        video_tokens: ``video_id -> N``, the rows of each visual's features (:func:`visual_rows`).
        video_wrap: see :func:`tokenize_conversation`.

    Returns:
        ``(kept, excluded)``; a shortened record gets ``"dropped_turns"``, an excluded one is
        ``{"id", "video", "reason"}`` (``video``: the record's, None for text-only and multi-image records).
    """
    kept, excluded = [], []
    for record in records:
        turns = record["conversations"]
        try:
            if record.get("unanswered"):
                raise ValueError("unanswered: no reference answer to train on")
            rows = [video_tokens[video] for video in visuals(record)]
            marked = [i for i, turn in enumerate(turns) if VIDEO_TOKEN in turn["value"]]
            shortest = max(marked, default=0) + 2 - max(marked, default=0) % 2  # through the last marker's answer
            for end in range(len(turns), shortest - 1, -2):
                ids, _ = tokenize_conversation(turns[:end], tokenizer, template, rows, video_wrap=video_wrap)
                if len(ids) <= max_length:
                    kept.append(record if end == len(turns) else
                                {**record, "conversations": turns[:end], "dropped_turns": len(turns) - end})
                    break
            else:
                raise ValueError(f"the visuals ({sum(rows)} tokens) and the answers through the last one need "
                                 f"{len(ids)} tokens, more than max_length {max_length}")
        except (KeyError, ValueError) as exc:
            reason = f"no features for {exc.args[0]!r}" if isinstance(exc, KeyError) else str(exc)
            excluded.append({"id": record["id"], "video": record.get("video"), "reason": reason})
    return kept, excluded


class InstructionDataset(Dataset):
    """LLaVA conversation records with their visuals' features.

    Each item is ``{"id", "input_ids": (L,) int64, "labels": (L,) int64, "video_features": (N, D) float16}`` where
    the ``N`` positions of ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the feature rows in order (:func:
    `record_features`: each marker its visual's rows; ``N = 0`` for a text-only record).

    Args:
        records: records that fit ``max_length`` (:func:`fit_records`), or their JSON file.
        max_length: longest sequence in tokens.
        video_wrap: see :func:`tokenize_conversation`.
        max_frames: see :meth:`FeatureStore.get`.
    """

    def __init__(self, records: list[dict] | str | Path, tokenizer, template: Template, store: FeatureStore,
                 max_length: int, video_wrap: tuple[int, int] | None = None, max_frames: int | None = None):
        self.records = read_json(records) if isinstance(records, (str, Path)) else records
        self.tokenizer, self.template, self.store, self.max_length = tokenizer, template, store, max_length
        self.video_wrap, self.max_frames = video_wrap, max_frames
        self.dim = store.dim  # also the width of a text-only sample's empty feature tensor

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        """Tokenize record ``index``.

        Raises:
            ValueError: the record is longer than ``max_length`` (it did not pass :func:`fit_records`).
        """
        record = self.records[index]
        features, rows = record_features(record, self.store, self.dim, self.max_frames)
        ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template, rows,
                                            video_wrap=self.video_wrap)
        if len(ids) > self.max_length:
            raise ValueError(f"record {record['id']!r}: {len(ids)} tokens > max_length {self.max_length}; "
                             "records must pass fit_records first")
        return {
            "id": record["id"],
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "video_features": features,
        }


class VideoCollator:
    """Pads a batch on the right: ``input_ids`` with ``pad_token_id``, ``labels`` with ``IGNORE_INDEX``.

    Returns ``input_ids`` ``(B, L)``, ``labels`` ``(B, L)``, ``attention_mask`` ``(B, L)`` int64 and
    ``video_features`` ``(sum N_i, D)``: every sample's rows, concatenated in batch order (``(0, D)`` for a batch of
    text-only samples). With ``trace`` it appends each batch's record ids to that file (one line a batch: the data
    order, to check a resumed run against an uninterrupted one).
    """

    def __init__(self, pad_token_id: int, trace: str | Path | None = None):
        self.pad_token_id, self.trace = pad_token_id, trace

    def __call__(self, batch: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = item["input_ids"], item["labels"], 1
        if self.trace is not None:
            with open(self.trace, "a", encoding="utf-8") as handle:
                handle.write(" ".join(item["id"] for item in batch) + "\n")
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "video_features": torch.cat([item["video_features"] for item in batch]),
        }
