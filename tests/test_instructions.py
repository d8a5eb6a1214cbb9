import json

import pytest

from pipeline.data.instructions import build, check_record, from_videochatgpt_qa, split_by_video
from pipeline.io import read_json, write_table


def _index(tmp_path, videos):
    path = tmp_path / "index.tsv"
    write_table(path, [{"video_id": v, "path": "x.h5", "tokens": 8, "dim": 4} for v in videos],
                ["video_id", "path", "tokens", "dim"])
    return path


def test_videochatgpt_qa_becomes_llava_conversations():
    (index, record, reason), = from_videochatgpt_qa([{"video_id": "v_1", "q": " What? ", "a": "That. "}])
    assert (index, reason) == (0, "")
    assert record == {"id": "v_1_0", "video": "v_1", "conversations": [
        {"from": "human", "value": "<video>\nWhat?"}, {"from": "gpt", "value": "That."}]}


def test_bad_entries_are_named_by_field():
    results = list(from_videochatgpt_qa([["x"], {"video_id": "v", "q": "", "a": "a"}, {"video_id": "v", "q": "q"}]))
    assert [r[2] for r in results] == ["entry is a list, not an object", "q: missing or empty", "a: missing or empty"]


def test_check_record():
    good = {"conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]}
    assert check_record(good) is None
    assert "expected 'gpt'" in check_record({"conversations": [{"from": "human", "value": "<video> q"}] * 2})
    no_marker = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert "<video> must appear once" in check_record(no_marker)


def test_split_by_video_holds_out_whole_videos_deterministically():
    videos = [f"v{i}" for i in range(10)]
    val = split_by_video(videos, 0.25, seed=0)
    assert len(val) == 3 and val == split_by_video(videos, 0.25, seed=0) and val != split_by_video(videos, 0.25, 1)
    assert split_by_video(["only"], 0.5, 0) == set()
    assert len(split_by_video(["a", "b"], 0.9, 0)) == 1


def test_build_joins_features_rejects_with_reasons_and_splits_by_video(tmp_path):
    annotations = [{"video_id": f"v{i}", "q": f"q{j}", "a": f"a{j}"} for i in range(8) for j in range(3)]
    annotations += [{"video_id": "gone", "q": "q", "a": "a"}, {"video_id": "v0", "q": "q"}]
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(annotations))
    counts = build(path, "videochatgpt_qa", _index(tmp_path, [f"v{i}" for i in range(8)]), tmp_path / "out", 0.25, 0)
    assert (counts["kept"], counts["rejected"]) == (24, 2)
    assert counts["rejected_by_reason"] == {"no features": 1, "invalid entry": 1}
    train, val = read_json(tmp_path / "out" / "train.json"), read_json(tmp_path / "out" / "val.json")
    assert (len(train), len(val)) == (18, 6)
    assert not {r["video"] for r in train} & {r["video"] for r in val}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["index"], r["reason"]) for r in rejected] == [
        (24, "video: no features for 'gone' (failed or missing video)"), (25, "a: missing or empty")]
    assert rejected[0]["file"] == str(path)


def test_build_refuses_a_file_that_is_not_a_list(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text("{}")
    with pytest.raises(ValueError, match="expected a JSON list"):
        build(path, "videochatgpt_qa", _index(tmp_path, []), tmp_path / "out", 0.2, 0)
