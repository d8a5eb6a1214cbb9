"""Chat with a trained stage about an uploaded video in the browser: ``python -m pipeline.webchat --stage
results/train/<stage>/model [--host 127.0.0.1] [--port 7860] [--max-upload-mib 200]``, a Gradio page at
``http://HOST:PORT``.

The page names the stage and the encoder its features come from (backend, model, layer, pooling, and whether its
weights are random: ``pretrained: null``). An uploaded video is prepared for the stage by
:meth:`pipeline.chat.VideoChat.prepare` (the data stages' own code, in memory) and its sampled frames are shown: an
online stage's frames as its tower gets them, a cached stage's upload at the times of the frames its tokens were
computed from. Questions about it are answered by :meth:`~pipeline.chat.VideoChat.reply`, streamed into the chat
word by word as they are generated, the earlier turns carried along.

Uploads are checked before anything decodes them: Gradio refuses a file over ``--max-upload-mib`` MiB while it is
uploaded and one whose extension is not one of :data:`pipeline.manifest.VIDEO_EXTENSIONS` before the upload reaches
the stage, each with an error message on the page. A file that is still not a video (a text named ``.mp4``) gets the
probe's words on the page (``error: x.mp4: not a video: text, starting '...'``). Every model call (preparing a video,
answering) goes through one queue: one request at a time, the others wait their turn.

The server listens on 127.0.0.1 unless ``--host`` says otherwise, and sends nothing anywhere (no analytics, no share
link). Uploads and the frames shown lie in Gradio's cache folder (``GRADIO_TEMP_DIR``, by default in the system's
temporary folder), removed once an hour after one hour. A folder that is not a stage, or a stage trained before
stages recorded their video settings, ends the command with one line, ``error: <reason>``, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import queue
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from pipeline.chat import VIDEO_ID, PreparedVideo, VideoChat, open_stage
from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.manifest import VIDEO_EXTENSIONS
from pipeline.shards import ItemError

THUMBNAIL = 320
"""The longest side, in pixels, of a cached stage's frames as the page shows them."""
CACHE_CLEANUP = (3600, 3600)
"""Gradio's ``delete_cache``: every hour (seconds), remove the uploads and frames older than an hour."""


def encoder_summary(chat: VideoChat) -> str:
    """One Markdown line on the encoder of ``chat``'s stage: backend, model, layer, pooling, and its weights: random
    (``pretrained: null``, with their seed), pretrained (the tag or checkpoint), or trained by the stage."""
    if chat.features is not None:
        tower, pooling = asdict(chat.features.encoder), chat.features.pooling
    else:
        tower, pooling = chat.meta["vision_tower"], "none (online: the frames go through the tower)"
    if chat.meta.get("vision_tower_weights"):
        weights = "trained by the stage"
    elif tower.get("pretrained") is None:
        weights = f"**random weights** (pretrained: null, seed {tower.get('seed', 0)})"
    else:
        weights = f"pretrained: `{tower['pretrained']}`"
    return (f"Encoder: `{tower['backend']}` `{tower['model']}`, layer {tower.get('layer', -1)}, pooling "
            f"`{pooling}`; {weights}.")


def frames_at(path: str | Path, times: list[float]) -> list:
    """The frames of the video at ``path`` shown at each of ``times`` (seconds, non-decreasing): the last frame that
    starts at or before each (the first frame for a time before it), decoded in one pass with PyAV.

    Returns:
        One ``PIL.Image`` a time, its longest side at most :data:`THUMBNAIL` pixels.

    Raises:
        ItemError: the video does not decode, or has no frame.
    """
    import av

    found: list = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            last = None
            for frame in container.decode(stream):
                while len(found) < len(times) and last is not None and (frame.time or 0.0) > times[len(found)] + 1e-3:
                    found.append(last.to_image())
                if len(found) == len(times):
                    break
                last = frame
    except (av.FFmpegError, IndexError) as exc:
        raise ItemError(f"decode error: {exc}") from None
    if last is None:
        raise ItemError("no decodable frame")
    found += [last.to_image()] * (len(times) - len(found))  # the times after the last frame's start
    for image in found:
        image.thumbnail((THUMBNAIL, THUMBNAIL))
    return found


def sampled_frames(prepared: PreparedVideo) -> list[tuple]:
    """The frames the stage sees of ``prepared``, captioned with their time: an online stage's frames as its tower
    gets them (``(H, W, 3)`` uint8), a cached stage's upload at the times of the frames its tokens come from
    (:func:`frames_at`).

    Raises:
        ItemError: a cached stage's upload does not decode.
    """
    info = prepared.info(VIDEO_ID)
    visual = prepared.load(VIDEO_ID)
    if "pixel_values" in visual:
        images = list(visual["pixel_values"].permute(0, 2, 3, 1).numpy())
        times = list(info.times) or [None] * len(images)  # no times: frames merged into clips
    else:
        # Video-ChatGPT's pooled rows have no per-frame times in the info: the store's layout has all of them
        times = list(info.times) or [float(t) for t in prepared.source.store.info(VIDEO_ID)["frame_times"]]
        images = frames_at(prepared.path, times)
    return [(image, f"{t:.2f} s" if t is not None else f"frame {i + 1}")
            for i, (image, t) in enumerate(zip(images, times))]


def streamed_reply(chat: VideoChat, prepared: PreparedVideo, history: list[tuple[str, str]],
                   question: str) -> Iterator[str]:
    """:meth:`VideoChat.reply` in a thread: the answer's text so far after each piece it streams, then the whole
    answer (as ``reply`` returns it: stripped, a matching stage's times filled in).

    Raises:
        ItemError: the prompt cannot be built; whatever else ``reply`` raises, once the thread ends.
    """
    pieces: queue.Queue[str | None] = queue.Queue()
    outcome: dict = {}

    def answer() -> None:
        try:
            outcome["answer"] = chat.reply(prepared, history, question, pieces.put)
        except BaseException as exc:  # raised again in the caller's thread
            outcome["error"] = exc
        finally:
            pieces.put(None)

    worker = threading.Thread(target=answer, name="webchat-reply", daemon=True)
    worker.start()
    text = ""
    while (piece := pieces.get()) is not None:
        text += piece
        yield text
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    yield outcome["answer"]


def _messages(history: list[tuple[str, str]]) -> list[dict]:
    """``(question, answer)`` pairs as the Chatbot's messages."""
    return [{"role": role, "content": text} for turn in history
            for role, text in zip(("user", "assistant"), turn)]


def build(chat: VideoChat, max_upload_bytes: int):
    """The page for ``chat``'s stage (module docstring): its events (an upload, a question) wait in Gradio's queue and
    run one at a time.

    Args:
        max_upload_bytes: the largest upload, in bytes, that :func:`serve` lets through; the page states it.

    Returns:
        The ``gradio.Blocks``, not yet launched.
    """
    import gradio as gr

    stage = chat.meta["stage"]
    with gr.Blocks(title=f"Video chat: {stage}", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as page:
        gr.Markdown(f"# Video chat: stage `{stage}`\n\n{encoder_summary(chat)}", elem_id="stage")
        prepared = gr.State(None)
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                video = gr.File(label=f"Video ({', '.join(VIDEO_EXTENSIONS)}; at most "
                                      f"{max_upload_bytes / 2**20:g} MiB)",
                                file_types=list(VIDEO_EXTENSIONS), elem_id="video")
                status = gr.Markdown("Upload a video to talk about.", elem_id="status")
                gallery = gr.Gallery(label="The frames the stage sees", columns=4, elem_id="frames")
            with gr.Column(scale=1):
                chatbot = gr.Chatbot(label=stage, render_markdown=False, buttons=["copy", "copy_all"],
                                     elem_id="chat")
                question = gr.Textbox(label="Question", placeholder="What happens in the video?", elem_id="question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")

        def upload(path: str | None):
            if path is None:
                return None, [], [], [], "Upload a video to talk about."
            name = Path(path).name
            try:
                ready = chat.prepare(path)
                frames = sampled_frames(ready)
            except ItemError as exc:
                return None, [], [], [], f"error: {name}: {exc}"
            duration = ready.info(VIDEO_ID).duration
            return ready, [], [], frames, f"{name}: {duration:.1f} s, {len(frames)} frames sampled. Ask about it."

        def answer(ready: PreparedVideo | None, turns: list[tuple[str, str]], asked: str):
            asked = asked.strip()
            if ready is None or not asked:
                yield turns, _messages(turns), asked, "Upload a video first." if ready is None else "Ask a question."
                return
            text = ""
            try:
                for text in streamed_reply(chat, ready, turns, asked):
                    yield turns, _messages([*turns, (asked, text)]), "", gr.skip()
            except ItemError as exc:
                yield turns, _messages(turns), asked, f"error: {exc}"
                return
            turns = [*turns, (asked, text)]
            yield turns, _messages(turns), "", gr.skip()

        # Gradio queues every event; these share one slot: the model prepares a video or answers, one at a time
        video.change(upload, video, [prepared, history, chatbot, gallery, status], concurrency_limit=1,
                     concurrency_id="model")
        for event in (ask.click, question.submit):
            event(answer, [prepared, history, question], [history, chatbot, question, status], concurrency_limit=1,
                  concurrency_id="model")

        def new_conversation():  # the chat's Clear button: about the same video
            return []

        chatbot.clear(new_conversation, None, history)
    return page


def serve(page, host: str, port: int, max_upload_bytes: int, block: bool = True) -> None:
    """Serve ``page`` at ``http://host:port``, refusing uploads over ``max_upload_bytes``: until interrupted, or with
    ``block`` false in a thread of its own until ``page.close()``.

    Raises:
        OSError: the port is taken (Gradio's words).
    """
    page.launch(server_name=host, server_port=port, max_file_size=max_upload_bytes, share=False, ssr_mode=False,
                footer_links=[], show_error=True, prevent_thread_lock=not block)


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.webchat --stage DIR [--host H] [--port P] [--max-upload-mib M] [--max-new-tokens N]
    [--temperature T]``."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--stage", required=True, help="a stage's model folder (results/train/<stage>/model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--max-upload-mib", type=float, default=200, help="largest upload in MiB")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Serve the page (module docstring) until interrupted; 2 when the stage folder cannot be used."""
    cli = parser()
    args = cli.parse_args(argv)
    if args.max_upload_mib <= 0:
        cli.error("--max-upload-mib must be > 0")
    logging.getLogger("libav").setLevel(logging.CRITICAL)  # what libav says of a bad file is in the probe's error
    chat = open_stage(args)
    if chat is None:
        return 2
    max_bytes = int(args.max_upload_mib * 2**20)
    serve(build(chat, max_bytes), args.host, args.port, max_bytes)
    return 0


if __name__ == "__main__":
    run(main)
