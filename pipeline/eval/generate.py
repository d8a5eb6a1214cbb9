"""Stage 7, evaluate: answer the held-out questions with a trained stage and score the answers.

Writes ``predictions.jsonl`` (one ``{id, video, question, reference, prediction}`` per record) and
``metrics.json`` (exact match and token F1, see :mod:`pipeline.eval.metrics`). Decoding is greedy, so a rerun
gives the same answers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from pipeline import configure_logging
from pipeline.data.templates import get_template, tokenize_conversation, video_wrap_ids
from pipeline.eval.metrics import score
from pipeline.features.store import FeatureStore
from pipeline.io import atomic_path, read_json, write_json
from pipeline.model.video_llm import load_stage

log = logging.getLogger(__name__)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, L)`` ids and attention mask of prompts padded on the left (so every answer starts at position L)."""
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
    and score it against the record's answer
    (on a GPU in bfloat16 when one is available, else on the CPU in float32).

    Returns:
        The metrics (also written to ``<out_dir>/metrics.json``).
    """
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_stage(model_dir, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(meta.get("tokenizer", meta["llm"]))
    wrap = video_wrap_ids(tokenizer, meta.get("video_start_end", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    template = get_template(meta["template"])
    store = FeatureStore(index)
    records = [record for path in records_paths for record in read_json(path)]
    predictions = []
    for first in range(0, len(records), batch_size):
        batch = records[first:first + batch_size]
        features = [torch.from_numpy(store.get(r["video"], meta.get("max_frames"))) for r in batch]
        prompts = [tokenize_conversation(r["conversations"], tokenizer, template, len(f), for_generation=True,
                                         video_wrap=wrap)[0] for r, f in zip(batch, features)]
        ids, mask = left_pad(prompts, pad_id)
        out = model.generate(ids.to(device), mask.to(device), torch.cat(features).to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad_id)
        for record, tokens in zip(batch, out):
            predictions.append({
                "id": record["id"], "video": record["video"],
                "question": record["conversations"][-2]["value"], "reference": record["conversations"][-1]["value"],
                "prediction": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            })
        log.info("generated %d/%d", len(predictions), len(records))
    metrics = {**score([(p["prediction"], p["reference"]) for p in predictions]),
               "model": str(model_dir), "records": [str(p) for p in records_paths], "max_new_tokens": max_new_tokens}
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "predictions.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    write_json(out_dir / "metrics.json", metrics)
    log.info("exact match %.3f, token F1 %.3f over %d records", metrics["exact_match"], metrics["token_f1"],
             metrics["count"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.eval.generate --model DIR --records VAL.json... --index I --out-dir D``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a stage's model folder")
    parser.add_argument("--records", required=True, nargs="+", help="the val splits")
    parser.add_argument("--index", required=True, help="the features index")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    evaluate(args.model, args.records, args.index, args.out_dir, args.max_new_tokens, args.batch_size)
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main())
