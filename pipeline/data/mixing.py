"""A stage's training data: a mix of instruction datasets with sampling ratios and caps, deterministic for a seed.

LLaVA-NeXT writes a mix as ``sampling_strategy: "first:10%" | "end:5000" | "random:50%" | "all"`` per dataset of a
YAML ``data_path``; here each entry of a stage's ``data`` names a dataset, a ``ratio`` (0.5 takes half its records,
2.0 repeats them twice) and a ``max_records`` cap, drawn at random with the stage's seed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import read_json, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MixEntry:
    """One dataset of a mix.

    Attributes:
        dataset: the dataset's name (``instructions.datasets[].name``).
        ratio: share of its records to take, above 1 to repeat them (whole copies, then a random part).
        max_records: at most this many records after the ratio (None: no cap).
    """

    dataset: str
    ratio: float = 1.0
    max_records: int | None = None

    def __post_init__(self) -> None:
        if self.ratio <= 0 or (self.max_records is not None and self.max_records < 1):
            raise ValueError(f"data[{self.dataset}]: need ratio > 0 and max_records >= 1, got {self}")


def sample(records: list, entry: MixEntry, seed: int) -> list:
    """``entry``'s share of ``records``: ``round(len * ratio)`` of them (capped), drawn without replacement within
    each whole copy, in a random order that depends only on ``seed`` and the dataset's name."""
    rng = random.Random(f"{seed}:{entry.dataset}")
    count = round(len(records) * entry.ratio)
    if entry.max_records is not None:
        count = min(count, entry.max_records)
    chosen = []
    while len(chosen) < count:
        order = list(range(len(records)))
        rng.shuffle(order)
        chosen += [records[i] for i in order[: count - len(chosen)]]
    return chosen


def mix(sources: list[tuple[MixEntry, list]], seed: int) -> tuple[list, dict]:
    """The mixed records of ``sources`` (entry, records) and per dataset ``{"available", "taken"}`` counts."""
    mixed, counts = [], {}
    for entry, records in sources:
        taken = sample(records, entry, seed)
        counts[entry.dataset] = {"available": len(records), "taken": len(taken), "ratio": entry.ratio,
                                 "max_records": entry.max_records}
        mixed += taken
    return mixed, counts


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.data.mixing --spec JSON --seed S --out DATA.json --counts COUNTS.json``: the stage_data
    rule. The spec is a JSON list of ``{"dataset", "records" (its train.json), "ratio", "max_records"}``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--spec", required=True, help="JSON list of {dataset, records, ratio, max_records}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the stage's training records")
    parser.add_argument("--counts", required=True, help="what was taken from each dataset")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write one stage's mix (:func:`mix`)."""
    args = parser().parse_args(argv)
    fields = ("dataset", "ratio", "max_records")
    sources = [(MixEntry(**{key: item[key] for key in fields if key in item}), read_json(item["records"]))
               for item in json.loads(args.spec)]
    records, counts = mix(sources, args.seed)
    write_json(args.out, records)
    write_json(args.counts, counts)
    log.info("%s: %d records from %s", Path(args.out).name, len(records), counts)
    return 0


if __name__ == "__main__":
    run(main)
