"""A shard job killed with SIGKILL halfway, then rerun: nothing partial is taken as done, nothing finished redone."""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from pipeline.io import read_table, write_table
from pipeline.video.ffmpeg import probe


def test_a_killed_shard_job_resumes_where_it_stopped(tmp_path, clips):
    rows = [{"video_id": f"seg_{i:02d}", "status": "ok", "reason": "", "path": str(clips["webm"]),
             "start": 5 * i, "end": 5 * i + 5} for i in range(10)]
    table, out, status = tmp_path / "download.tsv", tmp_path / "shard-00000", tmp_path / "shard-00000.tsv"
    write_table(table, rows, ["video_id", "status", "reason", "path", "start", "end"])
    command = [sys.executable, "-m", "pipeline.video.compress", "--input", str(table), "--out-dir", str(out),
               "--status", str(status), "--threads", "1", "--preset", "ultrafast"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    job = subprocess.Popen(command, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    partial = tmp_path / "shard-00000.partial"
    deadline = time.monotonic() + 120
    while len(list(partial.glob("seg_*.mp4"))) < 3:
        assert time.monotonic() < deadline and job.poll() is None, "the job ended before it could be killed"
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # as a scheduler kills a job: every process, no cleanup
    job.wait()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in partial.glob("seg_*.mp4")}
    assert 3 <= len(finished) < 10 and not status.exists() and not out.exists()

    subprocess.run(command, env=env, check=True, stderr=subprocess.DEVNULL)
    for name, stamp in finished.items():  # not redone
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    done = read_table(status)
    assert list(done["status"]) == ["ok"] * 10
    assert sorted(p.name for p in out.iterdir()) == [".settings.json"] + [f"seg_{i:02d}.mp4" for i in range(10)]
    for i in range(10):  # every video complete, none a leftover of the killed run
        assert probe(out / f"seg_{i:02d}.mp4").duration == pytest.approx(5.0, abs=0.4)
