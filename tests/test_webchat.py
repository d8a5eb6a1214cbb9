"""``python -m pipeline.webchat``: the page of a tiny stage folder (as tests/test_chat.py writes it), served as the
command serves it, driven in a real browser: headless Chromium over its DevTools protocol (a websocket,
websocket-client), uploading a real clip and asking about it. Skipped, with the reason, where Chromium (Debian's
``chromium``), gradio or websocket-client is missing."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_chat import write_stage

from pipeline.chat import VIDEO_ID, VideoChat
from pipeline.eval.generate import GenerationSettings

pytest.importorskip("gradio", reason="gradio is not installed (pip install gradio)")
websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (pip install websocket-client)")

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
MAX_UPLOAD_MIB = 1  # bikes.mp4 is 0.49 MiB
# sampled (from the settings' fixed seed): the tiny random Llama's greedy answer is newlines, stripped to nothing
SETTINGS = GenerationSettings(max_new_tokens=8, do_sample=True, temperature=1.0)
FIRST, SECOND = "What happens in the video?", "And then?"
# gradio's queue, under pandas 3, in the server's threads
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.Pandas4Warning:gradio.queueing")


class Browser:
    """Headless Chromium with one page, driven over the DevTools protocol (JSON messages on a websocket).

    Args:
        profile: an empty folder for the browser's profile.
        timeout: seconds to wait for the browser to start, and for each condition of :meth:`wait`.
    """

    def __init__(self, profile: Path, timeout: float = 20):
        self.timeout, self._id = timeout, 0
        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=1280,1024",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"  # the port it chose, written once it listens
        try:
            self._until(lambda: port_file.is_file() and len(port_file.read_text().split()) == 2, port_file.name)
            port = port_file.read_text().split()[0]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as answer:
                target = next(t for t in json.load(answer) if t["type"] == "page")
            self.socket = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=timeout,
                                                      suppress_origin=True)
        except BaseException:
            self.process.kill()
            self.process.wait()
            raise

    def _until(self, condition, what: str):
        """The first true value of ``condition()``, polled every 0.1 s; AssertionError after ``timeout`` s."""
        end = time.monotonic() + self.timeout
        while not (value := condition()):
            assert time.monotonic() < end, f"waited {self.timeout} s for {what}"
            time.sleep(0.1)
        return value

    def send(self, method: str, **params) -> dict:
        """The result of one DevTools command (the events that come before it are dropped)."""
        self._id += 1
        self.socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while (message := json.loads(self.socket.recv())).get("id") != self._id:
            pass
        assert "error" not in message, message["error"]
        return message["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)["result"]
        return result.get("value")

    def wait(self, expression: str):
        """The first truthy value of ``expression``."""
        return self._until(lambda: self.js(expression), expression)

    def texts(self, selector: str) -> list[str]:
        """The visible text of each element that ``selector`` matches."""
        return self.js(f"[...document.querySelectorAll({json.dumps(selector)})].map(e => e.innerText)")

    def upload(self, path: Path) -> None:
        """Choose ``path`` in the video's file input, as a person picking it does."""
        node = self.send("Runtime.evaluate", expression="document.querySelector('#video input[type=file]')")
        self.send("DOM.setFileInputFiles", files=[str(path)], objectId=node["result"]["objectId"])

    def ask(self, question: str) -> None:
        """Type ``question`` into the question box and press Ask."""
        self.js("document.querySelector('#question textarea').focus()")
        self.send("Input.insertText", text=question)
        self.js("document.querySelector('#ask').click()")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory, tiny_llm_dir):
    """A cached stage's folder (the tiny open_clip tower, random weights: ``pretrained: null``)."""
    return write_stage(tmp_path_factory.mktemp("stage") / "model", tiny_llm_dir)


@pytest.fixture(scope="module")
def chat(stage_dir):
    """The stage as the command loads it, for the answers the page should show."""
    return VideoChat(stage_dir, SETTINGS)


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat):
    """The stage's page served as the command serves it, in this process (with :func:`chat`'s model) on a free
    port, Gradio's cache in a folder of its own: its URL."""
    from pipeline.webchat import build, serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        page = build(chat, MAX_UPLOAD_MIB * 2**20)
        serve(page, "127.0.0.1", port, MAX_UPLOAD_MIB * 2**20, block=False)
        yield f"http://127.0.0.1:{port}"
        page.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip("Chromium not found (Debian: apt-get install chromium)")
    browser = Browser(tmp_path_factory.mktemp("chromium"))
    yield browser
    browser.close()


@pytest.fixture
def page(browser, server):
    """The page, freshly loaded (a new session: no video, no conversation)."""
    browser.send("Page.navigate", url=server)
    browser.wait("document.querySelector('#video input[type=file]') !== null && "
                 "document.querySelector('#status').innerText.startsWith('Upload a video')")
    return browser


def test_the_page_names_the_stage_and_its_encoder_and_says_its_weights_are_random(page):
    assert page.texts("#stage") == ["Video chat: stage chat\n\nEncoder: open_clip ViT-B-32, layer -2, pooling "
                                    "videochatgpt; random weights (pretrained: null, seed 0)."]
    assert page.js("document.title") == "Video chat: chat"


def test_a_real_clip_shows_the_frames_the_stage_sees_and_gets_its_streamed_answers(page, chat, bikes_clip):
    prepared = chat.prepare(bikes_clip)
    times = prepared.source.store.info(VIDEO_ID)["frame_times"]  # Video-ChatGPT pooling: every sampled frame
    first = chat.reply(prepared, [], FIRST)
    second = chat.reply(prepared, [(FIRST, first)], SECOND)
    assert first and second  # something to find on the page

    page.upload(bikes_clip)
    page.wait("document.querySelectorAll('#frames img').length === 4")
    assert page.texts("#status") == ["bikes.mp4: 10.0 s, 4 frames sampled. Ask about it."]
    assert page.texts("#frames .caption-label") == [f"{t:.2f} s" for t in times]
    page.ask(FIRST)
    page.wait(f"document.querySelector('#chat [data-testid=bot]')?.innerText === {json.dumps(first)}")
    page.ask(SECOND)  # the first turn goes along
    page.wait("document.querySelectorAll('#chat [data-testid=bot]').length === 2")
    page.wait(f"document.querySelectorAll('#chat [data-testid=bot]')[1].innerText === {json.dumps(second)}")
    assert page.texts("#chat [data-testid=user]") == [FIRST, SECOND]
    assert page.js("document.querySelector('#question textarea').value") == ""
    page.js("document.querySelector('#chat button[aria-label=Clear]').click()")  # a new conversation
    page.wait("document.querySelectorAll('#chat [data-testid=bot]').length === 0")
    page.ask(FIRST)
    page.wait(f"document.querySelector('#chat [data-testid=bot]')?.innerText === {json.dumps(first)}")
    assert page.texts("#chat [data-testid=user]") == [FIRST]


def test_a_text_file_named_mp4_gets_the_probes_words_on_the_page(page, tmp_path):
    video = tmp_path / "x.mp4"
    video.write_text("just some notes, not a video\n")
    page.upload(video)
    page.wait("document.querySelector('#status').innerText.startsWith('error')")
    assert page.texts("#status") == ["error: x.mp4: not a video: text, starting 'just some notes, not a video'"]
    assert page.js("document.querySelectorAll('#frames img').length") == 0
    page.ask(FIRST)
    page.wait("document.querySelector('#status').innerText === 'Upload a video first.'")


def test_another_type_or_a_file_over_the_limit_never_reaches_the_stage(page, server, tmp_path):
    import httpx

    notes, big = tmp_path / "notes.txt", tmp_path / "big.mp4"
    notes.write_text("just some notes, not a video\n")
    big.write_bytes(bytes(MAX_UPLOAD_MIB * 2**20 + 1))
    page.upload(notes)
    page.wait("document.querySelector('[data-testid=toast-body]')?.innerText.includes('Invalid file type: "
              "notes.txt. Only .mp4, .webm')")
    page.upload(big)
    page.wait("document.body.innerText.includes('exceed the maximum allowed size of 1.0 Mb: \"big.mp4\"')")
    assert page.texts("#status") == ["Upload a video to talk about."]
    # past the browser's own checks, the server refuses them too
    refused = httpx.post(f"{server}/gradio_api/upload", files={"files": ("big.mp4", big.read_bytes())},
                            timeout=10)
    assert (refused.status_code, refused.text) == (413, "File size exceeded maximum allowed size of 1048576 bytes.")


def test_every_model_call_waits_its_turn_in_one_queue(chat):
    from pipeline.webchat import build

    events = build(chat, 2**20).fns.values()
    calls = sorted((event.name, event.concurrency_id, event.concurrency_limit) for event in events
                   if event.name != "new_conversation")  # the chat's Clear button calls no model
    assert calls == [("answer", "model", 1)] * 2 + [("upload", "model", 1)]  # Ask, Enter; an upload


def test_the_answer_streams_as_it_grows(chat, bikes_clip):
    from pipeline.webchat import streamed_reply

    prepared = chat.prepare(bikes_clip)
    texts = list(streamed_reply(chat, prepared, [], FIRST))
    assert len(texts) > 2  # the words as they come, then the whole answer
    assert all(later.startswith(earlier) for earlier, later in zip(texts[:-2], texts[1:-1]))
    assert texts[-2].strip() == texts[-1] == chat.reply(prepared, [], FIRST)


def test_an_online_stage_shows_the_frames_its_tower_gets(tmp_path, tiny_llm_dir, bikes_clip):
    from pipeline.webchat import encoder_summary, sampled_frames

    online = write_stage(tmp_path / "model", tiny_llm_dir, vision="online",
                         frames={"sampling": "uniform", "num_frames": 3})
    chat = VideoChat(online, SETTINGS)
    prepared = chat.prepare(bikes_clip)
    frames = sampled_frames(prepared)
    pixels = prepared.load(VIDEO_ID)["pixel_values"]
    assert [caption for _, caption in frames] == [f"{t:.2f} s" for t in prepared.info(VIDEO_ID).times]
    assert np.array_equal(np.stack([image for image, _ in frames]), pixels.permute(0, 2, 3, 1).numpy())
    assert encoder_summary(chat) == ("Encoder: `open_clip` `ViT-B-32`, layer -2, pooling `none (online: the frames "
                                     "go through the tower)`; **random weights** (pretrained: null, seed 0).")


def test_the_command_serves_the_stage_on_127_0_0_1_by_default(monkeypatch, stage_dir):
    from pipeline import webchat

    served = []
    monkeypatch.setattr(webchat, "serve", lambda *args: served.append(args))
    assert webchat.main(["--stage", str(stage_dir)]) == 0
    [(page, *where)] = served
    assert page.title == "Video chat: chat"
    assert where == ["127.0.0.1", 7860, 200 * 2**20]


def test_a_folder_that_is_not_a_stage_is_one_error_line_and_exit_code_2(tmp_path, capsys):
    from pipeline.webchat import main

    assert main(["--stage", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path}: not a stage folder (no config.json with model_type "
                                       "'video_llm')\n")
