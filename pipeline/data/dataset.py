"""Training samples: instruction records + cached video features -> token ids, labels and feature rows.

:func:`fit_records` checks once, before training, that every sample's mask can be built exactly within the length
limit; the dataset then tokenizes lazily, per ``__getitem__``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline import IGNORE_INDEX
from pipeline.data.templates import Template, tokenize_conversation
from pipeline.features.store import FeatureStore
from pipeline.io import read_json


def fit_records(records: list[dict], tokenizer, template: Template, max_length: int,
                video_tokens: dict[str, int], video_wrap: tuple[int, int] | None = None
                ) -> tuple[list[dict], list[dict]]:
    """The records as they fit in ``max_length`` tokens, and the ones that cannot, with the reason.

    A record longer than ``max_length`` loses whole trailing question/answer pairs until it fits (its kept
    answers stay complete: no answer is ever cut, no sample trains on nothing). A record whose video and first
    answer alone do not fit, or that the template cannot render exactly, is excluded.

    Args:
        video_tokens: ``video_id -> N``, the rows of each video's features (the index's ``tokens``).
        video_wrap: see :func:`tokenize_conversation`.

    Returns:
        ``(kept, excluded)``; a shortened record gets ``"dropped_turns"``, an excluded one is
        ``{"id", "video", "reason"}``.
    """
    kept, excluded = [], []
    for record in records:
        turns = record["conversations"]
        try:
            rows = video_tokens[record["video"]]
            for end in range(len(turns), 0, -2):
                ids, _ = tokenize_conversation(turns[:end], tokenizer, template, rows, video_wrap=video_wrap)
                if len(ids) <= max_length:
                    kept.append(record if end == len(turns) else
                                {**record, "conversations": turns[:end], "dropped_turns": len(turns) - end})
                    break
            else:
                raise ValueError(f"the video ({rows} tokens) and the first answer need {len(ids)} tokens, more than "
                                 f"max_length {max_length}")
        except (KeyError, ValueError) as exc:
            reason = f"no features for {record['video']!r}" if isinstance(exc, KeyError) else str(exc)
            excluded.append({"id": record["id"], "video": record["video"], "reason": reason})
    return kept, excluded


class InstructionDataset(Dataset):
    """LLaVA conversation records with their videos' features.

    Each item is ``{"input_ids": (L,) int64, "labels": (L,) int64, "video_features": (N, D) float16}`` where the
    ``N = T + S`` positions of ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the feature rows in order.

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

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        """Tokenize record ``index``.

        Raises:
            ValueError: the record is longer than ``max_length`` (it did not pass :func:`fit_records`).
        """
        record = self.records[index]
        features = torch.from_numpy(self.store.get(record["video"], self.max_frames))
        ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template, len(features),
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
    ``video_features`` ``(sum N_i, D)``: every sample's rows, concatenated in batch order. With ``trace`` it
    appends each batch's record ids to that file (one line a batch: the data order, to check a resumed run against
    an uninterrupted one).
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
