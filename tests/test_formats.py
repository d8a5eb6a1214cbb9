"""The annotation formats of the five systems, on small fixtures written in each format (tests/fixtures/formats)."""

import json
from pathlib import Path

import pytest

from pipeline.data.formats import Options, readable_class, ssv2_answer, video_reference
from pipeline.data.instructions import build, check_record, split_by_video
from pipeline.data.mixing import MixEntry, mix, sample
from pipeline.features.store import INDEX_COLUMNS
from pipeline.io import read_json, write_table

FIXTURES = Path(__file__).parent / "fixtures" / "formats"


def _build(tmp_path, fmt, annotations, videos, **options):
    """Convert with every video of ``videos`` (id -> duration or None) indexed; everything goes to train."""
    index = tmp_path / "index.tsv"
    write_table(index, [{"video_id": v, "path": "s.h5", "tokens": 8, "dim": 4, "duration": d if d else ""}
                        for v, d in videos.items()], INDEX_COLUMNS)
    counts = build(annotations, fmt, index, tmp_path / "out", 0.0, 0, Options(**options))
    records = {r["id"]: r for r in read_json(tmp_path / "out" / "train.json")}
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    return counts, records, rejected


def test_videoinstruct_alternates_the_video_marker_strips_gpt_debris_and_explains_rejections(tmp_path):
    counts, records, rejected = _build(tmp_path, "videochatgpt_qa", FIXTURES / "videoinstruct.json",
                                       {"v_k_ZXmr8pmrs": None, "v_mTDRTiTnsjQ": None})
    assert list(records) == ["v_k_ZXmr8pmrs_0", "v_k_ZXmr8pmrs_1", "v_mTDRTiTnsjQ_0"]
    first, second = records["v_k_ZXmr8pmrs_0"]["conversations"], records["v_k_ZXmr8pmrs_1"]["conversations"]
    assert first[0]["value"] == "What is the man doing in the video?\n<video>"  # even entry: after the question
    assert second[0]["value"] == "<video>\nWhere does this take place?"  # odd entry: before
    assert first[1]["value"] == "The man is playing a guitar on a stage."  # QA_GT_caption_based_noisy removed
    assert counts["rejected_by_reason"] == {"invalid entry": 1, "duplicate": 1, "no features": 1, "empty answer": 1}
    reasons = {r["where"].rsplit(" ", 1)[-1]: r["reason"] for r in rejected}
    assert reasons["3"] == "entry: 'a' is a required property"
    assert reasons["4"].startswith("record repeats an earlier one exactly")
    assert reasons["5"] == "video: no features for 'v_missing0001' (failed or missing video)"
    assert reasons["6"] == "conversations[1].value: empty answer"
    assert all(r["where"].startswith(f"{FIXTURES / 'videoinstruct.json'} entry ") for r in rejected)


def test_videoinstruct_placement_can_be_fixed(tmp_path):
    _, records, _ = _build(tmp_path, "videochatgpt_qa", FIXTURES / "videoinstruct.json", {"v_k_ZXmr8pmrs": None},
                           video_placement="before")
    assert all(r["conversations"][0]["value"].startswith("<video>\n") for r in records.values())


def test_videollama_pairs_become_multi_turn_and_unsafe_paths_are_refused(tmp_path):
    counts, records, rejected = _build(tmp_path, "videollama_qa", FIXTURES / "videollama.json",
                                       {"train_fall_down_video_127": None, "clips__wave__train_wave_video_3": None})
    assert records["train_fall_down_video_127_0"]["conversations"] == [
        {"from": "human", "value": "<video>\nWhat is the action shown in the displayed video."},
        {"from": "gpt", "value": "Fall down"}]
    wave = records["clips__wave__train_wave_video_3_1"]["conversations"]
    assert [t["from"] for t in wave] == ["human", "gpt", "human", "gpt"] and wave[2]["value"] == "Is it a greeting?"
    assert counts["rejected_by_reason"] == {"unsafe path": 2, "invalid entry": 1}
    assert "escapes the dataset root" in rejected[0]["reason"] and "outside the dataset root" in rejected[1]["reason"]
    assert rejected[2]["reason"] == "QA: [] should be non-empty"


def test_class_folders_by_split_folder_and_by_file_prefix(tmp_path, short_clip):
    data = short_clip.read_bytes()
    for relative in ("by_folder/train/fall_down/a.avi", "by_folder/train/WaveHand/b.avi",
                     "by_folder/test/fall_down/c.avi", "by_prefix/fall-down/train_fall_down_1.mp4",
                     "by_prefix/fall-down/test_fall_down_2.mp4", "by_prefix/loose.mp4"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(data)
    videos = {v: None for v in ("train__fall_down__a", "train__WaveHand__b", "test__fall_down__c",
                                "fall-down__train_fall_down_1", "fall-down__test_fall_down_2")}
    _, train, _ = _build(tmp_path / "a", "class_folders", tmp_path / "by_folder", videos, split="train")
    assert {r["video"]: r["conversations"][1]["value"] for r in train.values()} == {
        "train__fall_down__a": "Fall down", "train__WaveHand__b": "Wave hand"}
    assert all(r["conversations"][0]["value"].startswith("<video>\n") for r in train.values())
    counts, test, rejected = _build(tmp_path / "b", "class_folders", tmp_path / "by_prefix", videos, split="test")
    assert list(test) == ["fall-down__test_fall_down_2"]
    assert rejected[0]["reason"] == "loose.mp4: not inside a class folder"
    assert readable_class("JumpingJack") == "Jumping jack" and readable_class("fall_down") == "Fall down"


def test_ssv2_official_fills_placeholders_and_checks_labels(tmp_path):
    counts, records, rejected = _build(
        tmp_path, "ssv2", FIXTURES / "something-something-v2-train.json",
        {"78687": None, "42326": None, "100904": None, "3": None},
        labels=str(FIXTURES / "something-something-v2-labels.json"))
    answers = {r["video"]: r["conversations"][1]["value"] for r in records.values()}
    assert answers == {"78687": "Holding potato next to vicks vaporub bottle",
                       "100904": "Moving drawer of night stand"}
    assert records["78687"]["conversations"][0]["value"] == "<video>\nDescribe this video."
    assert counts["rejected_by_reason"] == {"placeholder mismatch": 1, "unknown label": 1}
    assert rejected[0]["reason"].startswith("placeholders: 1 placeholder(s) ['margarine'] for the 2 slot(s)")
    assert "Dancing with [something]" in rejected[1]["reason"]


def test_ssv2_fork_reads_space_separated_csv_and_id2label(tmp_path):
    counts, records, rejected = _build(tmp_path, "ssv2_fork", FIXTURES / "train.csv",
                                       {"108961": None, "74225": None, "9999": None},
                                       labels=str(FIXTURES / "something-something-v2-id2label.json"))
    assert {r["video"]: r["conversations"][1]["value"] for r in records.values()} == {
        "108961": "Holding something next to something", "74225": "Spreading something onto something"}
    assert counts["rejected_by_reason"] == {"unknown label": 1, "invalid entry": 1}
    assert rejected[1]["where"].endswith("train.csv line 4")
    assert ssv2_answer("Putting [something] on [something]", ["a pen", "a book"]) == "Putting a pen on a book"


def test_llava_next_video_records_images_and_text(tmp_path):
    video = "academic_source__activitynet__v_abc"
    indexed = {video: None, "coco__train2017__000000033471": None, "spot-the-diff__harbor_1": None,
               "spot-the-diff__harbor_2": None}
    counts, records, rejected = _build(tmp_path, "llava", FIXTURES / "llava_next.json", indexed, images="drop")
    assert list(records) == ["v_abc", "sharegpt_1"] and records["v_abc"]["video"] == video
    assert records["v_abc"]["conversations"][0]["value"] == "<video>\nWhat happens after the man picks up the guitar?"
    assert len(records["v_abc"]["conversations"]) == 4
    assert "video" not in records["sharegpt_1"] and records["sharegpt_1"]["conversations"][0]["value"] == "Hello"
    assert counts["rejected_by_reason"] == {"image record (dropped)": 2, "invalid conversation": 2}
    assert counts["kept_by_kind"] == {"video": 1, "text only": 1}
    assert "must appear once" in rejected[1]["reason"] and "expected 'gpt'" in rejected[2]["reason"]
    counts, records, _ = _build(tmp_path / "keep", "llava", FIXTURES / "llava_next.json", indexed)  # the default
    image = records["000000033471"]
    assert image["modality"] == "image" and image["conversations"][0]["value"].startswith("<video>\nWhat are")
    assert counts["kept_by_kind"] == {"video": 1, "image": 1, "text only": 1, "images": 1}


def test_llamavid_webvid_ids_are_integers(tmp_path):
    _, records, _ = _build(tmp_path, "llamavid", FIXTURES / "llava_558k_with_webvid.json",
                           {"001001_001050__1066674784": None})
    assert records["1066674784"]["conversations"][0]["value"] == "<video>\nDescribe the video concisely."


def test_et_instruct_timestamps_are_kept_rendered_and_checked(tmp_path):
    videos = {"didemo__12090392_N02_4919624883": None, "how_to_step__PJi8ZEHAFcI": 200.8, "didemo__late": None,
              "didemo__short": None}
    counts, records, rejected = _build(tmp_path, "etchat", FIXTURES / "et_instruct_164k_vid.json", videos)
    pool = records["didemo_0"]
    assert pool["conversations"][1]["value"] == "The girl jumps from 5.0s to 10.0s."
    assert pool["timestamps"] == {"src": [], "tgt": [5.0, 10.0]} and pool["duration"] == 30.0
    steps = records["how_to_step_1"]["conversations"]
    assert steps[0]["value"].endswith("at 12s - 18s seconds. When do the next two steps happen?")
    assert steps[1]["value"] == "36s - 44s seconds, then 49s - 57s seconds."
    assert counts["rejected_by_reason"] == {"timestamp outside the video": 1, "invalid entry": 1,
                                            "segment ends before it starts": 1}
    assert rejected[0]["reason"] == "tgt: 31.5 s outside the video's 30.0 s"  # E.T. Chat would clamp it
    videos["didemo__12090392_N02_4919624883"] = 4.0  # the video as compressed is shorter than the entry says
    _, records, rejected = _build(tmp_path / "short", "etchat", FIXTURES / "et_instruct_164k_vid.json", videos)
    assert "didemo_0" not in records and rejected[0]["reason"] == "timestamps: 5.0 s beyond the video's 4.0 s"


def test_video_reference_stays_inside_the_root(tmp_path):
    assert video_reference("a/./b/../c.mp4", None) == "a__c"
    assert video_reference(str(tmp_path / "x" / "v.mp4"), str(tmp_path)) == "x__v"
    for bad in ("../v.mp4", "a/../../v.mp4", "/elsewhere/v.mp4"):
        with pytest.raises(Exception, match="root"):
            video_reference(bad, str(tmp_path))


def test_split_by_video_holds_out_whole_videos_deterministically():
    videos = [f"v{i}" for i in range(10)]
    val = split_by_video(videos, 0.25, seed=0)
    assert len(val) == 3 and val == split_by_video(videos, 0.25, seed=0) and val != split_by_video(videos, 0.25, 1)
    assert split_by_video(["only"], 0.5, 0) == set()


def test_mixing_ratios_caps_and_repeats_are_deterministic():
    a, b = list(range(100)), [f"b{i}" for i in range(10)]
    records, counts = mix([(MixEntry("a", 0.25), a), (MixEntry("b", 2.5, max_records=22), b)], seed=7)
    assert counts == {"a": {"available": 100, "taken": 25, "ratio": 0.25, "max_records": None},
                      "b": {"available": 10, "taken": 22, "ratio": 2.5, "max_records": 22}}
    assert records == mix([(MixEntry("a", 0.25), a), (MixEntry("b", 2.5, max_records=22), b)], seed=7)[0]
    assert records[:25] != sample(a, MixEntry("a", 0.25), seed=8)
    repeated = sample(b, MixEntry("b", 2.5), seed=7)
    assert len(repeated) == 25 and all(repeated.count(x) >= 2 for x in b)  # two whole copies, then a random half
    with pytest.raises(ValueError):
        MixEntry("c", ratio=0)


def test_check_record():
    good = {"video": "v", "conversations": [{"from": "human", "value": "<video>\nq"}, {"from": "gpt", "value": "a"}]}
    assert check_record(good) is None
    assert "expected 'gpt'" in check_record({"conversations": [{"from": "human", "value": "<video> q"}] * 2})
    no_marker = {"video": "v", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert "<video> must appear once" in check_record(no_marker)
    assert check_record({"conversations": good["conversations"][:1]}) == "conversations: need human/gpt pairs"
