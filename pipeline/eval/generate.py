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
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.data.formats import visuals
from pipeline.data.templates import get_template, video_wrap_ids
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


def decode_answer(tokenizer, tokens: list[int], matched: list[int] | None = None, times: tuple[float, ...] = (),
                  token_id: int | None = None) -> str:
    """The text of generated ``tokens``; with matching, each ``<vid>`` (``token_id``) becomes the time in seconds
    of the frame it matched (``matched``, in order; ``times``: each frame's time), one decimal, as E.T. Chat's
    ``detokenize`` writes the matched index at its 1 fps from t = 0 (``etchat/utils/tokenization.py:29-45``)."""
    if token_id is None or not matched:
        return tokenizer.decode(tokens, skip_special_tokens=True).strip()
    pieces, run, frames = [], [], iter(matched)
    for token in tokens:
        if token == token_id:
            frame = next(frames)
            pieces += [tokenizer.decode(run, skip_special_tokens=True),
                       f"{round(times[frame], 1) if frame < len(times) else frame}"]
            run = []
        else:
            run.append(token)
    pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces).strip()


def stage_source(model, meta: dict, index: str | Path | None, videos: str | Path | None):
    """The visual source a stage reads at inference: the cached features of ``index``, or for a stage with online
    vision the frames of ``videos`` (the compressed videos' index), sampled as the stage was trained and not
    augmented.

    Raises:
        ValueError: the path the stage's vision needs is not given.
    """
    from pipeline.data.dataset import CachedVisuals
    from pipeline.features.store import FeatureStore

    if meta.get("vision") == "online":
        from pipeline.data.frames import online_visuals

        if videos is None:
            raise ValueError(f"stage {meta['stage']} reads frames (vision: online): give the videos' index")
        return online_visuals(videos, meta["frames"], model.vision_tower, meta["vision_tower"].get("resize", "crop"))
    if index is None:
        raise ValueError(f"stage {meta['stage']} reads cached features: give the features index")
    return CachedVisuals(FeatureStore(index), meta.get("max_frames"))


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are generated (``evaluate.generation``, or a benchmark's ``generation`` in the config).

    Attributes:
        max_new_tokens: longest answer in tokens.
        do_sample: sample (with ``temperature``, ``top_p``) instead of greedy decoding; greedy reruns give the same
            answers, sampled ones only under the same seed and batch.
        temperature, top_p: the sampling settings (ignored when greedy).
        video_placement: where ``<video>`` goes in a benchmark question: ``before`` it (lmms-eval's tasks) or
            ``after`` it (Video-ChatGPT's inference scripts).
        batch_size: questions generated at once.
        seed: the torch seed set before generation.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    video_placement: str = "before"
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.video_placement not in ("before", "after"):
            raise ValueError(f"video_placement: {self.video_placement!r} is not before or after")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of ``generate`` these settings give."""
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p}


class _LastVideo:
    """A visual source (``.source``) that keeps the last video it loaded: questions sorted by video read its
    features once."""

    def __init__(self, source):
        self.source, self._name, self._loaded, self._info = source, None, None, None

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self.source

    def _read(self, video_id: str) -> None:
        if video_id != self._name:
            self._name, self._loaded, self._info = video_id, self.source.load(video_id), self.source.info(video_id)

    def load(self, video_id: str) -> dict:
        self._read(video_id)
        return self._loaded

    def info(self, video_id: str):
        self._read(video_id)
        return self._info


class StageAnswerer:
    """A trained stage loaded to answer questions about the videos of its visual source (on a GPU in bfloat16
    when one is available, else on the CPU in float32).

    Args:
        model_dir: the stage's model folder (it carries its tokenizer, template and video wrapping).
        index, videos: the features index (cached stages) or the compressed videos' index (online stages).

    Raises:
        ValueError: the path the stage's vision needs is not given (:func:`stage_source`).
    """

    def __init__(self, model_dir: str | Path, index: str | Path | None = None, videos: str | Path | None = None):
        import torch
        from transformers import AutoTokenizer

        from pipeline.data.dataset import InstructionDataset
        from pipeline.model.checkpoint import load_stage, stage_query_tokenizer

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_stage(model_dir, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model.to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)  # a stage folder carries its tokenizer
        wrap = video_wrap_ids(self.tokenizer, self.meta["video_start_end"])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.source = _LastVideo(stage_source(self.model, self.meta, index, videos))
        self.match_id = self.meta["matching"]["token_id"] if self.meta.get("matching") else None
        query = stage_query_tokenizer(self.model.mm_projector, self.meta.get("connector") or {}, model_dir)
        self.samples = InstructionDataset([], self.tokenizer, get_template(self.meta["template"]), self.source,
                                          self.model.mm_projector, 10**9, wrap, self.meta.get("video_prompt"),
                                          query_tokenizer=query, match_token_id=self.match_id)

    def __contains__(self, video_id: str) -> bool:
        """Whether the stage's visual source has ``video_id`` (features, or a compressed video)."""
        return video_id in self.source

    def answer(self, records: list[dict], settings: GenerationSettings) -> list[str]:
        """The generated answer to the last question of each record (LLaVA conversations ending with a human turn,
        or with the answer, which is left out), in order; records of the same video should be adjacent, so that
        its visuals are read once.

        Raises:
            pipeline.data.dataset.ItemError: a record's visual cannot be loaded.
        """
        import torch

        from pipeline.data.dataset import VideoCollator

        torch.manual_seed(settings.seed)
        answers, size = [], settings.batch_size
        for first in range(0, len(records), size):
            batch = records[first:first + size]
            loaded = [self.samples.item(r, for_generation=True) for r in batch]
            ids, mask = left_pad([item["input_ids"].tolist() for item in loaded], self.pad_id)
            visual = {key: value.to(self.device) for key, value in VideoCollator(self.pad_id)(loaded).items()
                      if key in _VISUAL_KEYS}
            out = self.model.generate(ids.to(self.device), mask.to(self.device), **visual,
                                      **settings.generate_kwargs(), eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.pad_id)
            out, matched = out if self.match_id is not None else (out, [None] * len(batch))
            for record, tokens, frames in zip(batch, out, matched):
                names = visuals(record)
                times = self.source.info(names[0]).times if frames and names else ()
                answers.append(decode_answer(self.tokenizer, tokens.tolist(), frames, times, self.match_id))
            log.info("generated %d/%d", len(answers), len(records))
        return answers


_VISUAL_KEYS = ("video_features", "visual_layout", "pixel_values", "visual_frames", "query_input_ids",
                "query_attention_mask", "vid_frames")


def evaluate(model_dir: str | Path, records_paths: list[str | Path], index: str | Path | None, out_dir: str | Path,
             max_new_tokens: int = 32, batch_size: int = 8, videos: str | Path | None = None) -> dict:
    """Generate a greedy answer to the last question of every record of ``records_paths`` (the datasets' val
    splits) and score it against the record's answer, when it has one.

    Args:
        index, videos: the features index (cached stages) or the compressed videos' index (online stages).

    Returns:
        The metrics (also written to ``<out_dir>/metrics.json``).
    """
    answerer = StageAnswerer(model_dir, index, videos)
    records = [record for path in records_paths for record in read_json(path)]
    answers = answerer.answer(records, GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size))
    predictions = []
    for record, answer in zip(records, answers):
        answered = not record.get("unanswered")  # an unanswered record ends with its question
        predictions.append({
            "id": record["id"], "video": record.get("video"),
            **({"videos": record["videos"]} if "videos" in record else {}),
            "question": record["conversations"][-2 if answered else -1]["value"],
            "reference": record["conversations"][-1]["value"] if answered else None,
            "prediction": answer,
        })
    metrics = {**score([(p["prediction"], p["reference"]) for p in predictions if p["reference"] is not None]),
               "unscored": sum(p["reference"] is None for p in predictions),
               "model": str(model_dir), "records": [str(p) for p in records_paths], "max_new_tokens": max_new_tokens}
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "predictions.jsonl", predictions)
    write_json(out_dir / "metrics.json", metrics)
    log.info("exact match %.3f, token F1 %.3f over %d records", metrics["exact_match"], metrics["token_f1"],
             metrics["count"])
    return metrics


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """``rows`` as JSON lines (UTF-8, one object a line), written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.eval.generate --model DIR --records VAL.json... --index I --out-dir D``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--model", required=True, help="a stage's model folder")
    parser.add_argument("--records", required=True, nargs="+", help="the val splits")
    parser.add_argument("--index", help="the features index (stages with cached vision)")
    parser.add_argument("--videos", help="the compressed videos' index (stages with online vision)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Evaluate one stage (:func:`evaluate`)."""
    args = parser().parse_args(argv)
    evaluate(args.model, args.records, args.index, args.out_dir, args.max_new_tokens, args.batch_size, args.videos)
    return 0


if __name__ == "__main__":
    run(main)
