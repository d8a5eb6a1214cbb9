"""Stage 7, evaluate: answer the held-out questions with a trained stage and score the answers.

Writes ``predictions.jsonl`` (one ``{id, video, question, reference, prediction}`` per record; a multi-image
record has ``video`` null and ``videos``, its ids; an unanswered record, SSv2's test split, has ``reference`` null)
and ``metrics.json`` (exact match and token F1 over the records with a reference, see :mod:`pipeline.eval.metrics`;
``unscored``: the predictions without one). Decoding is greedy, so a rerun gives the same answers.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.data.templates import get_template, tokenize_conversation, video_wrap_ids
from pipeline.eval.metrics import score
from pipeline.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)


def left_pad(prompts: list[list[int]], pad_id: int):
    """``(B, L)`` int64 ids and attention mask of prompts padded on the left (so every answer starts at position
    L)."""
    import torch

    length = max(map(len, prompts))
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt)
        mask[i, length - len(prompt):] = 1
    return ids, mask


def evaluate(model_dir: str | Path, records_paths: list[str | Path], index: str | Path, out_dir: str | Path,
             max_new_tokens: int = 32, batch_size: int = 8) -> dict:
    """Generate an answer to the last question of every record of ``records_paths`` (the datasets' val splits)
    and score it against the record's answer, when it has one
    (on a GPU in bfloat16 when one is available, else on the CPU in float32).

    Returns:
        The metrics (also written to ``<out_dir>/metrics.json``).
    """
    import torch
    from transformers import AutoTokenizer

    from pipeline.data.dataset import record_features
    from pipeline.features.store import FeatureStore
    from pipeline.model.checkpoint import load_stage

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_stage(model_dir, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)  # a stage folder carries its tokenizer
    wrap = video_wrap_ids(tokenizer, meta["video_start_end"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template = get_template(meta["template"])
    store = FeatureStore(index)
    records = [record for path in records_paths for record in read_json(path)]
    predictions = []
    for first in range(0, len(records), batch_size):
        batch = records[first:first + batch_size]
        visual = [record_features(r, store, meta["mm_hidden_size"], meta.get("max_frames")) for r in batch]
        prompts = [tokenize_conversation(r["conversations"], tokenizer, template, rows, for_generation=True,
                                         video_wrap=wrap)[0] for r, (_, rows) in zip(batch, visual)]
        ids, mask = left_pad(prompts, pad_id)
        out = model.generate(ids.to(device), mask.to(device), torch.cat([f for f, _ in visual]).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad_id)
        for record, tokens in zip(batch, out):
            answered = not record.get("unanswered")  # an unanswered record ends with its question
            predictions.append({
                "id": record["id"], "video": record.get("video"),
                **({"videos": record["videos"]} if "videos" in record else {}),
                "question": record["conversations"][-2 if answered else -1]["value"],
                "reference": record["conversations"][-1]["value"] if answered else None,
                "prediction": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            })
        log.info("generated %d/%d", len(predictions), len(records))
    metrics = {**score([(p["prediction"], p["reference"]) for p in predictions if p["reference"] is not None]),
               "unscored": sum(p["reference"] is None for p in predictions),
               "model": str(model_dir), "records": [str(p) for p in records_paths], "max_new_tokens": max_new_tokens}
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "predictions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    write_json(out_dir / "metrics.json", metrics)
    log.info("exact match %.3f, token F1 %.3f over %d records", metrics["exact_match"], metrics["token_f1"],
             metrics["count"])
    return metrics


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.eval.generate --model DIR --records VAL.json... --index I --out-dir D``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--model", required=True, help="a stage's model folder")
    parser.add_argument("--records", required=True, nargs="+", help="the val splits")
    parser.add_argument("--index", required=True, help="the features index")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluate one stage (:func:`evaluate`)."""
    args = parser().parse_args(argv)
    evaluate(args.model, args.records, args.index, args.out_dir, args.max_new_tokens, args.batch_size)
    return 0


if __name__ == "__main__":
    run(main)
