import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.download import download_shard, fetch, source_suffix
from pipeline.io import sha256_file, write_table
from pipeline.shards import MANIFEST_COLUMNS, ItemError


@pytest.fixture
def http_root(tmp_path, clips):
    """A real HTTP server on 127.0.0.1 serving one real clip; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "bikes.mp4").write_bytes(clips["bikes"].read_bytes())
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_fetch_local_path_and_file_url_verify_sha256(tmp_path, clips):
    digest = sha256_file(clips["bikes"])
    assert fetch(str(clips["bikes"]), tmp_path / "a.mp4", digest)["sha256"] == digest
    assert fetch(clips["bikes"].as_uri(), tmp_path / "b.mp4", digest)["bytes"] == clips["bikes"].stat().st_size
    with pytest.raises(ItemError, match="checksum mismatch: expected 0{64}, got " + digest):
        fetch(str(clips["bikes"]), tmp_path / "c.mp4", "0" * 64)
    with pytest.raises(ItemError, match="missing source file"):
        fetch(str(tmp_path / "nope.mp4"), tmp_path / "d.mp4")
    with pytest.raises(ItemError, match="unsupported source scheme"):
        fetch("ftp://host/x.mp4", tmp_path / "e.mp4")


def test_fetch_http_and_its_errors(tmp_path, clips, http_root):
    digest = sha256_file(clips["bikes"])
    assert fetch(f"{http_root}/bikes.mp4", tmp_path / "a.mp4", digest, timeout_s=10)["sha256"] == digest
    with pytest.raises(ItemError, match="HTTP 404"):
        fetch(f"{http_root}/missing.mp4", tmp_path / "b.mp4", timeout_s=10, retries=0)


def test_source_suffix():
    assert source_suffix("https://host/a/b.WEBM?x=1") == ".webm"
    assert source_suffix("file:///data/clip.mp4") == ".mp4"
    assert source_suffix("/data/noext") == ".video"


def test_download_shard_fetches_a_shared_source_once_and_isolates_failures(tmp_path, clips, http_root):
    digest = sha256_file(clips["webm"])
    shard = tmp_path / "shard.tsv"
    write_table(shard, [
        {"video_id": "seg_0", "source": clips["webm"].as_uri(), "sha256": digest, "start": 0, "end": 5},
        {"video_id": "seg_1", "source": clips["webm"].as_uri(), "sha256": digest, "start": 5, "end": 10},
        {"video_id": "remote", "source": f"{http_root}/bikes.mp4"},
        {"video_id": "wrong", "source": str(clips["bikes"]), "sha256": "1" * 64},
    ], MANIFEST_COLUMNS)
    status = {r["video_id"]: r for r in download_shard(shard, tmp_path / "raw", threads=2, timeout_s=10, retries=0)}
    assert status["seg_0"]["path"] == status["seg_1"]["path"] == str(tmp_path / "raw" / "seg_0.webm")
    assert (status["seg_1"]["start"], status["seg_1"]["end"]) == ("5", "10")
    assert status["remote"]["status"] == "ok"
    assert status["wrong"]["status"] == "failed" and status["wrong"]["reason"].startswith("checksum mismatch")
    assert sorted(p.name for p in (tmp_path / "raw").glob("*.*") if not p.name.startswith(".")) == [
        "remote.mp4", "seg_0.webm"]
