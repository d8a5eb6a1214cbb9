"""Training samples: instruction records + cached video features -> token ids, labels and feature rows.

Tokenization is lazy (per ``__getitem__``), so a 100K-record file starts training at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.templates import Template, tokenize_conversation
from pipeline.features.store import FeatureStore
from pipeline.io import read_json

log = logging.getLogger(__name__)


class InstructionDataset(Dataset):
    """LLaVA conversation records with their videos' features.

    Each item is ``{"input_ids": (L,) int64, "labels": (L,) int64, "video_features": (N, D) float16}`` where the
    ``N = T + S`` positions of ``VIDEO_TOKEN_INDEX`` in ``input_ids`` take the feature rows in order.

    Args:
        records: a JSON list of records, or its path.
        max_length: longest sequence in tokens; longer ones are cut at the end (never inside the video span).
    """

    def __init__(self, records: list[dict] | str | Path, tokenizer, template: Template, store: FeatureStore,
                 max_length: int):
        self.records = read_json(records) if isinstance(records, (str, Path)) else records
        self.tokenizer, self.template, self.store, self.max_length = tokenizer, template, store, max_length
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        """Tokenize record ``index``.

        Raises:
            ValueError: the video span does not fit in ``max_length`` (names the record and both lengths).
        """
        record = self.records[index]
        features = torch.from_numpy(self.store.get(record["video"]))
        ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template, len(features))
        if len(ids) > self.max_length:
            last_video = max((i for i, t in enumerate(ids) if t == VIDEO_TOKEN_INDEX), default=-1)
            if last_video >= self.max_length:
                raise ValueError(
                    f"record {record['id']!r}: video tokens end at position {last_video + 1} > max_length "
                    f"{self.max_length}; raise max_length or use fewer video tokens"
                )
            ids, labels = ids[: self.max_length], labels[: self.max_length]
            if all(label == IGNORE_INDEX for label in labels) and record["id"] not in self._warned:
                self._warned.add(record["id"])
                log.warning("record %r: no answer token left after cutting to max_length %d; it adds no loss",
                            record["id"], self.max_length)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "video_features": features,
        }


@dataclass
class VideoCollator:
    """Pads a batch on the right: ``input_ids`` with ``pad_token_id``, ``labels`` with ``IGNORE_INDEX``.

    Returns ``input_ids`` ``(B, L)``, ``labels`` ``(B, L)``, ``attention_mask`` ``(B, L)`` int64 and
    ``video_features`` ``(sum N_i, D)``: every sample's rows, concatenated in batch order.
    """

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        length = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = item["input_ids"], item["labels"], 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "video_features": torch.cat([item["video_features"] for item in batch]),
        }
