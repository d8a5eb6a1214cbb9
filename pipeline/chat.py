"""Chat with a trained stage about any video: ``python -m pipeline.chat --stage results/train/<stage>/model --video
FILE``, a conversation in the terminal with the answers streamed as they are generated (word by word);
``--question Q`` for one answer, ``--json`` for one JSON object.

The video goes through the data stages' own code, in memory, with the settings the stage's folder records (its
``stage.yaml``: ``compress``, and for a cached stage ``features``; its ``config.json``: the tower, template, video
wrapping and prompt), so a new video gets the tokens the stage learnt from: probed and compressed to the stage's
frame rate and size as the compress rule does (:func:`pipeline.video.ffmpeg.encode`, single-pass, in a temporary
folder removed at once), then, for a cached stage, its frames sampled, encoded by the stage's tower and pooled as the
features rule does (:mod:`pipeline.features.extract`), or for an online stage its frames sampled and fitted to the
stage's tower as its evaluation reads them (:func:`pipeline.eval.generate.stage_source`). Prompts are tokenized by
the training dataset (:class:`pipeline.data.dataset.InstructionDataset`) and answered by the stage's ``generate``,
on a GPU in bfloat16 when there is one. Nothing is written beside the video or in the working directory.

A file that is not a video ends the command with one line, ``error: <file>: <reason>`` (the probe's words: ``not a
video: text, starting '...'``), and exit code 2; so does a folder that is not a stage, or a stage trained before
stages recorded their ``features`` and ``compress`` settings (retrain it: the workflow reruns it by itself).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pipeline import VIDEO_TOKEN
from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.eval.generate import GenerationSettings, decode_answer
from pipeline.io import read_yaml
from pipeline.shards import ItemError
from pipeline.video.ffmpeg import Encoding, probe

VIDEO_ID = "video"
"""The id under which a prepared video is its visual source's one video."""
STAGE_SETTINGS = "stage.yaml"


class _OneVideoStore:
    """:class:`pipeline.features.store.FeatureStore`'s read interface (``index``, ``get``, ``rows``, ``info``,
    ``dim``, ``in``) over one video's tokens in memory, laid out as the features rule stores them, for a
    :class:`pipeline.data.dataset.CachedVisuals`.

    Args:
        features: ``(N, D)`` float16 tokens.
        layout: ``videochatgpt`` (T temporal rows, then S spatial) or ``frames`` (T frames of S tokens).
        t, s: T and S.
        indices: ``(T,)`` int64 sampled frames; times: ``(T,)`` float32 their times in seconds.
        index: its one-row ``index.tsv`` (``INDEX_COLUMNS``, the video's ``duration``), read when the
            ``CachedVisuals`` is made.
    """

    def __init__(self, features: np.ndarray, layout: str, t: int, s: int, indices: np.ndarray, times: np.ndarray,
                 index: Path):
        self.features, self.index = features, str(index)
        self.layout = {"layout": layout, "T": t, "S": s, "frame_indices": indices, "frame_times": times}
        self.per_frame, self.t = [layout == "frames"], [t]  # a one-row shard, as FeatureStore._kept_frames reads

    @property
    def dim(self) -> int:
        """D, the width of the tokens."""
        return self.features.shape[1]

    def __contains__(self, video_id: str) -> bool:
        return video_id == VIDEO_ID

    def _kept(self, video_id: str, max_frames: int | None) -> np.ndarray | None:
        from pipeline.features.store import FeatureStore

        if video_id != VIDEO_ID:
            raise KeyError(video_id)
        return FeatureStore._kept_frames(self, 0, max_frames)

    def get(self, video_id: str, max_frames: int | None = None) -> np.ndarray:
        """The ``(N, D)`` float16 tokens (a copy); ``max_frames`` as :meth:`FeatureStore.get`."""
        kept = self._kept(video_id, max_frames)
        if kept is None:
            return self.features.copy()
        frames = self.features.reshape(self.layout["T"], self.layout["S"], -1)[kept]
        return np.ascontiguousarray(frames).reshape(-1, self.dim)

    def rows(self, video_id: str, max_frames: int | None = None) -> int:
        """N, the rows :meth:`get` returns with ``max_frames``."""
        kept = self._kept(video_id, max_frames)
        return len(self.features) if kept is None else len(kept) * self.layout["S"]

    def info(self, video_id: str) -> dict:
        """``layout``, ``T``, ``S``, ``frame_indices``, ``frame_times`` (seconds), as :meth:`FeatureStore.info`."""
        self._kept(video_id, None)
        return dict(self.layout)


class PreparedVideo:
    """A video prepared for a stage, in memory: the visual source (``load``, ``info``, ``in``) that holds it under
    :data:`VIDEO_ID`, for :class:`pipeline.data.dataset.InstructionDataset`.

    Attributes:
        path: the video as given.
        source: the pipeline's source it was read from, once: a ``CachedVisuals`` over its tokens in memory (cached
            stages) or an ``OnlineVisuals`` over its compressed copy, since removed (online stages); its class
            tells the dataset tokens from frames.
    """

    def __init__(self, path: str | Path, source):
        self.path, self.source = str(path), source
        self._visual, self._info = source.load(VIDEO_ID), source.info(VIDEO_ID)

    def __contains__(self, video_id: str) -> bool:
        return video_id == VIDEO_ID

    def load(self, video_id: str) -> dict:
        """``{"video_features": (N, D) float16, "layout": (T, S)}`` (cached stages) or ``{"pixel_values": (T, 3, H,
        W) uint8, "layout": (T', S)}`` (online stages).

        Raises:
            KeyError: ``video_id`` is not :data:`VIDEO_ID`.
        """
        if video_id != VIDEO_ID:
            raise KeyError(video_id)
        return self._visual

    def info(self, video_id: str):
        """The video's :class:`pipeline.data.dataset.VisualInfo` (its duration in seconds, frames, tokens).

        Raises:
            KeyError: ``video_id`` is not :data:`VIDEO_ID`.
        """
        if video_id != VIDEO_ID:
            raise KeyError(video_id)
        return self._info


def stage_video_settings(stage_dir: str | Path, meta: dict):
    """How a stage's videos were compressed and, for a cached stage, turned into tokens: the ``compress`` and
    ``features`` blocks of its folder's ``stage.yaml`` (:func:`pipeline.train.config.resolve_stage`), with the
    tower of its ``config.json``.

    Returns:
        The :class:`Encoding` (no audio) and, for a cached stage, the
        :class:`pipeline.features.extract.FeatureConfig`; None for an online stage.

    Raises:
        ValueError: the folder has no ``stage.yaml``, or it records no ``compress`` (or, cached, ``features``)
            settings: a stage trained before stages recorded them.
    """
    from pipeline.features.extract import FeatureConfig

    path = Path(stage_dir) / STAGE_SETTINGS
    if not path.is_file():
        raise ValueError(f"{stage_dir}: no {STAGE_SETTINGS} (the stage's settings)")
    settings = read_yaml(path)
    cached = meta.get("vision", "cached") == "cached"
    missing = [key for key in ("compress", *(["features"] if cached else [])) if not settings.get(key)]
    if missing:
        raise ValueError(f"{path}: records no {' or '.join(missing)} settings (a stage trained before stages "
                         "recorded how its videos were compressed and featurised): train it again, and the new video "
                         "gets the features it learnt from")
    encoding = Encoding(**settings["compress"], audio=False)
    if not cached:
        return encoding, None
    return encoding, FeatureConfig.from_dict({**meta["vision_tower"], **settings["features"]})


def _streamer(tokenizer, callback: Callable[[str], None] | None):
    """A ``generate`` streamer (transformers' ``TextStreamer``: whole words once formed) that passes the answer's
    text to ``callback`` and keeps in ``first_token`` when the first new token came (``time.perf_counter``)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        first_token: float | None = None

        def put(self, value) -> None:
            if not self.next_tokens_are_prompt and self.first_token is None:  # the prompt's put comes first
                self.first_token = time.perf_counter()
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and callback is not None:
                callback(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


class VideoChat:
    """A trained stage loaded to talk about videos (the CLI's, and a web demo's, engine).

    Args:
        stage_dir: the stage's model folder (``results/train/<stage>/model``).
        settings: how answers are generated (:class:`GenerationSettings`; ``video_placement``: the video before or
            after the first question; ``batch_size`` is not used: one question at a time).

    Attributes:
        meta: the stage folder's :func:`pipeline.model.checkpoint.read_stage_config`.
        encoding: how a video is compressed (:func:`stage_video_settings`).
        features: a cached stage's features settings (None for online stages); encoder: its tower.
        timings: of the last :meth:`reply`, ``first_token_s`` (seconds from the call to the first new token; with
            E.T. Chat's matching, which does not stream, to the whole answer) and ``reply_s``.

    Raises:
        ValueError: ``stage_dir`` is not a stage folder, or lacks its video settings (:func:`stage_video_settings`).
    """

    def __init__(self, stage_dir: str | Path, settings: GenerationSettings = GenerationSettings(max_new_tokens=256)):
        import torch
        from transformers import AutoTokenizer

        from pipeline.data.templates import get_template, video_wrap_ids
        from pipeline.features.encoder import FrameEncoder
        from pipeline.model.checkpoint import load_stage, read_stage_config, stage_query_tokenizer

        self.settings = settings
        self.encoding, self.features = stage_video_settings(stage_dir, read_stage_config(stage_dir))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_stage(stage_dir, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model.to(self.device)
        self.encoder = FrameEncoder(self.features.encoder) if self.features is not None else None
        self.tokenizer = AutoTokenizer.from_pretrained(stage_dir)  # a stage folder carries its tokenizer
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.template = get_template(self.meta["template"])
        self.wrap = video_wrap_ids(self.tokenizer, self.meta["video_start_end"])
        self.match_id = self.meta["matching"]["token_id"] if self.meta.get("matching") else None
        self.query = stage_query_tokenizer(self.model.mm_projector, self.meta.get("connector") or {}, stage_dir)
        self.timings: dict[str, float] = {}

    def prepare(self, video: str | Path) -> PreparedVideo:
        """Probe, compress (in a temporary folder, removed before returning) and read ``video`` for the stage.

        Returns:
            The :class:`PreparedVideo`: its ``(N, D)`` float16 tokens (cached stage) or ``(T, 3, H, W)`` uint8
            frames (online stage).

        Raises:
            ItemError: the file is not a video the data stages accept (missing, empty, text, no video stream, it
                does not decode), with the probe's, ffmpeg's or the decoder's words.
            pipeline.shards.JobError: ffmpeg is not installed.
        """
        from pipeline.video.ffmpeg import encode

        with tempfile.TemporaryDirectory(prefix="pipeline-chat-") as tmp:
            compressed = Path(tmp) / f"{VIDEO_ID}.mp4"
            fields = encode({"path": str(video)}, compressed, self.encoding)
            if self.features is None:
                return PreparedVideo(video, self._frames(compressed, fields, Path(tmp)))
            return PreparedVideo(video, self._tokens(compressed, float(fields["duration"]), Path(tmp)))

    def _tokens(self, compressed: Path, duration: float, tmp: Path):
        """A ``CachedVisuals`` over a cached stage's tokens of the compressed video (``duration`` seconds),
        computed and laid out as the features rule's ``extract_shard`` stores them, its one-row index in ``tmp``.

        Raises:
            ItemError: the frames do not decode, or the tokens are not finite.
        """
        from pipeline.data.dataset import CachedVisuals
        from pipeline.features.extract import video_tokens
        from pipeline.features.store import INDEX_COLUMNS
        from pipeline.io import write_table
        from pipeline.video.frames import read_frames

        config, encoder = self.features, self.encoder
        frames, indices, times = read_frames(compressed, config.sampling, encoder.tower.clip_frames)
        features, t, per_frame = video_tokens(encoder, encoder.prep(frames), config)
        index = tmp / "features.tsv"
        write_table(index, [{"video_id": VIDEO_ID, "path": "", "tokens": len(features), "dim": features.shape[1],
                             "duration": duration}], INDEX_COLUMNS)
        store = _OneVideoStore(features.numpy(), config.pooling, t, per_frame, indices, times, index)
        return CachedVisuals(store, self.meta.get("max_frames"))

    def _frames(self, compressed: Path, fields: dict, tmp: Path):
        """An online stage's ``OnlineVisuals`` over the compressed video (``fields``: its probe's), through a
        one-row videos index in ``tmp``, as the stage's evaluation reads its videos."""
        from pipeline.eval.generate import stage_source
        from pipeline.io import write_table
        from pipeline.video.index import VIDEO_COLUMNS

        index = tmp / "videos.tsv"
        write_table(index, [{**fields, "video_id": VIDEO_ID, "path": str(compressed)}], VIDEO_COLUMNS)
        return stage_source(self.model, self.meta, None, index)

    def reply(self, prepared: PreparedVideo, history: list[tuple[str, str]], question: str,
              stream: Callable[[str], None] | None = None) -> str:
        """The stage's answer to ``question`` about ``prepared``, after the earlier turns of ``history``
        (``(question, answer)`` pairs; the video goes with the first question, ``settings.video_placement``; a
        literal ``<video>`` typed in a question is dropped: the video has one place).

        Args:
            stream: called with each piece of the answer's text as it is generated (whole words; with matching,
                which does not stream, the whole answer once).

        Returns:
            The answer (with matching, each ``<vid>`` as its frame's time in seconds).

        Raises:
            ItemError: the prompt cannot be built (:meth:`InstructionDataset.item`).
        """
        import torch

        from pipeline.data.dataset import InstructionDataset, VideoCollator

        start = time.perf_counter()
        turns = []
        for i, (asked, answered) in enumerate([*history, (question, None)]):
            asked = asked.replace(VIDEO_TOKEN, "")
            if i == 0:
                before = self.settings.video_placement == "before"
                asked = f"{VIDEO_TOKEN}\n{asked}" if before else f"{asked}\n{VIDEO_TOKEN}"
            turns.append({"from": "human", "value": asked})
            if answered is not None:
                turns.append({"from": "gpt", "value": answered})
        samples = InstructionDataset([], self.tokenizer, self.template, prepared, self.model.mm_projector, 10**9,
                                     self.wrap, self.meta.get("video_prompt"), query_tokenizer=self.query,
                                     match_token_id=self.match_id)
        item = samples.item({"id": "chat", "video": VIDEO_ID, "conversations": turns}, for_generation=True)
        batch = VideoCollator(self.pad_id)([item])
        visual = {key: value.to(self.device) for key, value in batch.items()
                  if key not in ("input_ids", "labels", "attention_mask")}
        streamer = _streamer(self.tokenizer, stream) if self.match_id is None else None
        torch.manual_seed(self.settings.seed)
        with torch.inference_mode():
            out = self.model.generate(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                      **visual, **self.settings.generate_kwargs(),
                                      eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.pad_id,
                                      **({"streamer": streamer} if streamer is not None else {}))
        if self.match_id is None:
            answer = decode_answer(self.tokenizer, out[0].tolist())
        else:
            tokens, matched = out
            answer = decode_answer(self.tokenizer, tokens[0].tolist(), matched[0], prepared.info(VIDEO_ID).times,
                                   self.match_id)
            if stream is not None:
                stream(answer)
        end = time.perf_counter()
        first = streamer.first_token if streamer is not None and streamer.first_token is not None else end
        self.timings = {"first_token_s": first - start, "reply_s": end - start}
        return answer


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.chat --stage DIR --video FILE [--question Q] [--json]``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--stage", required=True, help="a stage's model folder (results/train/<stage>/model)")
    parser.add_argument("--video", required=True, help="any video file the data stages accept")
    parser.add_argument("--question", help="ask this, print the answer and exit")
    parser.add_argument("--json", action="store_true",
                        help="with --question: print one JSON object (stage, video, question, answer, timings)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled")
    return parser


def open_stage(args: argparse.Namespace) -> VideoChat | None:
    """The :class:`VideoChat` of a command line's ``--stage``, ``--max-new-tokens`` and ``--temperature`` (0:
    greedy); None, after one ``error: ...`` line on stderr, when the folder is not a usable stage."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                                  temperature=args.temperature or 1.0)
    try:
        return VideoChat(args.stage, settings)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _conversation(chat: VideoChat, prepared) -> None:
    """Questions from stdin, streamed answers to stdout, until an empty line or end of input."""
    print(f"{prepared.path}: {prepared.info(VIDEO_ID).duration:.1f} s. Ask about it (an empty line ends).",
          flush=True)
    history: list[tuple[str, str]] = []
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print(flush=True)
            break
        if not question:
            break
        print(f"{chat.meta['stage']}> ", end="", flush=True)
        history.append((question, chat.reply(prepared, history, question,
                                             lambda text: print(text, end="", flush=True))))
        print(flush=True)


def main(argv: list[str] | None = None) -> int:
    """Answer questions about one video (module docstring); 2 when the video or the stage folder cannot be used."""
    start = time.perf_counter()
    cli = parser()
    args = cli.parse_args(argv)
    if args.json and args.question is None:
        cli.error("--json needs --question")
    logging.getLogger("libav").setLevel(logging.CRITICAL)  # what libav says of a bad file is in the probe's error
    try:
        probe(args.video)  # a file that is no video fails before the model loads
    except ItemError as exc:
        print(f"error: {args.video}: {exc}", file=sys.stderr)
        return 2
    # a conversation in the terminal: warnings (random tower weights, say), not progress (PIPELINE_LOG_LEVEL: more)
    logging.getLogger().setLevel(os.environ.get("PIPELINE_LOG_LEVEL", "WARNING"))
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    chat = open_stage(args)
    if chat is None:
        return 2
    loaded = time.perf_counter()
    try:
        prepared = chat.prepare(args.video)
    except ItemError as exc:
        print(f"error: {args.video}: {exc}", file=sys.stderr)
        return 2
    ready = time.perf_counter()
    if args.question is None:
        _conversation(chat, prepared)
        return 0
    answer = chat.reply(prepared, [], args.question,
                        None if args.json else lambda text: print(text, end="", flush=True))
    if not args.json:
        print(flush=True)
        return 0
    print(json.dumps({"stage": args.stage, "video": args.video, "question": args.question, "answer": answer,
                      "timings": {"load_s": round(loaded - start, 3), "prepare_s": round(ready - loaded, 3),
                                  "first_token_s": round(chat.timings["first_token_s"], 3),
                                  "total_s": round(time.perf_counter() - start, 3)}}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    run(main)
