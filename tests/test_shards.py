import errno
import threading

import pytest

from pipeline.io import read_table, write_table
from pipeline.shards import MANIFEST_COLUMNS, ItemError, ShardTask, finish, run_shard, split_manifest


def _manifest(tmp_path, rows):
    path = tmp_path / "manifest.tsv"
    write_table(path, rows, MANIFEST_COLUMNS)
    return path


def test_split_cuts_shards_in_order_and_rejects_bad_rows_with_reasons(tmp_path):
    rows = [{"video_id": f"v{i}", "source": f"/data/v{i}.mp4"} for i in range(5)]
    rows += [
        {"video_id": "../escape", "source": "/x.mp4"},
        {"video_id": "v1", "source": "/again.mp4"},
        {"video_id": "cut", "source": "/x.mp4", "start": "5", "end": "2"},
        {"video_id": "nosource", "source": ""},
        {"video_id": "badsha", "source": "/x.mp4", "sha256": "abc"},
    ]
    shards = split_manifest(_manifest(tmp_path, rows), 2, tmp_path / "shards")
    assert [p.name for p in shards] == ["shard-00000.tsv", "shard-00001.tsv", "shard-00002.tsv"]
    assert [list(read_table(p)["video_id"]) for p in shards] == [["v0", "v1"], ["v2", "v3"], ["v4"]]
    rejected = read_table(tmp_path / "shards" / "rejected.tsv")
    reasons = dict(zip(rejected["video_id"], rejected["reason"]))
    assert set(reasons) == {"../escape", "v1", "cut", "nosource", "badsha"}
    assert "row 6: video_id" in reasons["../escape"]
    assert "row 7: video_id: 'v1' repeats" in reasons["v1"]
    assert "end: 2.0 must be greater than start 5.0" in reasons["cut"]
    assert "source: empty" in reasons["nosource"]
    assert "sha256" in reasons["badsha"]


def test_split_names_a_missing_column(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id\tsource\nv\t/x\n")
    with pytest.raises(ValueError, match="missing column.*video_id"):
        split_manifest(path, 10, tmp_path / "shards")


def _task(calls, fail=(), settings=None):
    def produce(row, tmp):
        calls.append(row["video_id"])
        if row["video_id"] in fail:
            raise ItemError(f"broken {row['video_id']}")
        tmp.write_text(row["video_id"])
        return {"size": len(row["video_id"])}

    return ShardTask(ext=".txt", produce=produce, describe=lambda p: {"size": len(p.read_text())},
                     settings=settings or {"v": 1})


def test_failed_video_is_a_row_and_costs_nothing_else(tmp_path):
    calls = []
    rows = [{"video_id": v} for v in ("a", "bad", "c")]
    status = run_shard(rows, _task(calls, fail={"bad"}), tmp_path / "out", threads=2)
    assert [(r["video_id"], r["status"]) for r in status] == [("a", "ok"), ("bad", "failed"), ("c", "ok")]
    assert status[1]["reason"] == "broken bad"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.txt")) == ["a.txt", "c.txt"]
    assert status[0]["path"] == str(tmp_path / "out" / "a.txt")


def test_unexpected_error_is_a_row_but_a_full_disk_fails_the_job(tmp_path):
    def produce(row, tmp):
        if row["video_id"] == "odd":
            raise KeyError("surprise")
        raise OSError(errno.ENOSPC, "No space left on device")

    task = ShardTask(ext=".txt", produce=produce, describe=lambda p: {}, settings={})
    status = run_shard([{"video_id": "odd"}], task, tmp_path / "a")
    assert status[0]["status"] == "failed" and "unexpected KeyError" in status[0]["reason"]
    with pytest.raises(OSError, match="No space"):
        run_shard([{"video_id": "full"}], task, tmp_path / "b")


def test_killed_shard_resumes_without_redoing_finished_videos_or_trusting_partial_files(tmp_path):
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    rows = [{"video_id": "done"}, {"video_id": "todo"}]
    calls = []

    def killed(row, tmp):
        if row["video_id"] == "todo":
            tmp.write_text("half")
            raise SystemExit("killed")  # not an error of the video: the job dies
        return _task(calls).produce(row, tmp)

    with pytest.raises(SystemExit):
        run_shard(rows, ShardTask(ext=".txt", produce=killed, describe=lambda p: {}, settings={"v": 1}), out)
    assert sorted(p.name for p in partial.iterdir()) == [".settings.json", "done.txt"] and not out.exists()
    (partial / ".todo.abc123.tmp.txt").write_text("half")  # what SIGKILL leaves behind
    calls.clear()
    status = run_shard(rows, _task(calls), out)
    assert calls == ["todo"]
    assert [r["status"] for r in status] == ["ok", "ok"]
    assert (out / "todo.txt").read_text() == "todo"
    assert not partial.exists()
    assert sorted(p.name for p in out.iterdir()) == [".settings.json", "done.txt", "todo.txt"]


def test_partial_output_from_other_settings_is_discarded(tmp_path):
    calls = []
    partial = tmp_path / "out.partial"
    run_shard([{"video_id": "a"}], _task(calls, settings={"fps": 3}), tmp_path / "first")
    (tmp_path / "first").rename(partial)
    calls.clear()
    run_shard([{"video_id": "a"}], _task(calls, settings={"fps": 1}), tmp_path / "out")
    assert calls == ["a"]


def test_threads_run_videos_concurrently(tmp_path):
    barrier = threading.Barrier(2, timeout=10)

    def produce(row, tmp):
        barrier.wait()  # deadlocks (times out) unless both videos run at once
        tmp.write_text("x")
        return {}

    task = ShardTask(ext=".txt", produce=produce, describe=lambda p: {}, settings={})
    status = run_shard([{"video_id": "a"}, {"video_id": "b"}], task, tmp_path / "out", threads=2)
    assert [r["status"] for r in status] == ["ok", "ok"]


def test_partial_output_made_from_other_input_files_is_discarded(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("v1")
    calls = []
    rows = [{"video_id": "a", "path": str(source)}]
    run_shard(rows, _task(calls), tmp_path / "first")
    (tmp_path / "first").rename(tmp_path / "out.partial")  # as a killed run leaves it
    source.write_text("v2, rewritten by a rerun of the stage before")
    calls.clear()
    run_shard(rows, _task(calls), tmp_path / "out")
    assert calls == ["a"]


def test_strict_mode_fails_the_job_after_writing_the_table(tmp_path):
    status = [{"video_id": "a", "status": "ok", "reason": "", "path": "a.mp4"},
              {"video_id": "b", "status": "failed", "reason": "broken", "path": ""}]
    assert finish(status, tmp_path / "lenient.tsv", ["video_id", "status", "reason", "path"], strict=False) == 0
    assert finish(status, tmp_path / "strict.tsv", ["video_id", "status", "reason", "path"], strict=True) == 1
    assert list(read_table(tmp_path / "strict.tsv")["reason"]) == ["", "broken"]
