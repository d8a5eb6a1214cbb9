"""Charades-STA scoring (pipeline/eval/benchmarks/grounding.py); expected numbers worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.eval.benchmarks import grounding
from pipeline.eval.benchmarks.base import InputError

FIX = Path(__file__).parent / "fixtures" / "benchmarks"
K1 = "3MSZA.mp4>>>person turn a light on.>>>[24.3, 30.4]"
K2 = "3MSZA.mp4>>>person flipped the light switch near the door.>>>[24.3, 30.4]"
K3 = "AO8RW.mp4>>>a person is putting a book on a shelf.>>>[0.0, 10.0]"
K4 = "AO8RW.mp4>>>person opens the door.>>>[10, 20]"


def test_load_keys_prompt_and_bad_records():
    items, bad = grounding.load_charades_sta(FIX / "charades_sta.json")
    assert [i["id"] for i in items] == [K1, K2, K3, K4]  # the keys exactly as lmms-eval's f-string writes them
    assert sorted((Path(b["file"]).name, b["record"], b["field"]) for b in bad) == [
        ("charades_sta.json", "4", "timestamp"),
        ("charades_sta.json", "5", "caption"),
    ]
    assert items[0]["span"] == [24.3, 30.4]
    assert items[0]["prompt"] == (
        "Please find the visual event described by a sentence in the video, determining its starting and ending "
        "times. The format should be: 'The event happens in the start time - end time'. For example, The event "
        "'person turn a light on' happens in the 24.3 - 30.4 seonds. Now I will give you the textual sentence: "
        "person turn a light on.. Please return its start time and end time."
    )


def test_score_both_variants(tmp_path):
    items, _ = grounding.load_charades_sta(FIX / "charades_sta.json")
    submission = tmp_path / "inference_results_temporal_grounding_charades.json"
    submission.write_text(json.dumps({
        K1: "The event happens in the 24.3 - 30.4 seconds.",  # both: [24.3, 30.4], IoU 1
        K2: "The event happens in 20.0 \u2013 30.4 seconds.",  # en dash: VCF invalid; lmms-eval IoU 6.1/10.4
        K3: "0:02 - 0:08",  # VCF reads "02 - 0" -> [0, 2], IoU 0.2; lmms-eval a clock range [2, 8], IoU 0.6
        "other.mp4>>>x>>>[1, 2]": "1 - 2",  # unknown key
    }, indent=4))  # K4 unanswered
    preds = grounding.read_predictions(submission)
    vcf = grounding.score(items, preds, variant="videochat_flash")
    # IoUs [1, 0, 0.2, 0]
    assert vcf["units"] == "percent" and vcf["count"] == 4
    assert (vcf["R@0.3"], vcf["R@0.5"], vcf["R@0.7"]) == (25.0, 25.0, 25.0)
    assert vcf["mIoU"] == pytest.approx(30.0)
    assert (vcf["invalid"], vcf["unanswered"], vcf["unknown_predictions"]) == (1, 1, 1)
    le = grounding.score(items, preds, variant="lmms_eval")
    # IoUs [1, 0.5865385, 0.6, 0]
    assert (le["R@0.3"], le["R@0.5"], le["R@0.7"]) == (75.0, 75.0, 25.0)
    assert le["mIoU"] == pytest.approx(100 * (1 + 6.1 / 10.4 + 0.6) / 4)
    assert le["invalid"] == 0 and le["overall"] == le["R@0.5"]


def test_extract_time_rules():
    assert grounding.extract_time("12.5 - 17.0 seconds") == [12.5, 17.0]
    # the first number of each keyword sentence (split at !?\n only), paired and sorted; one sentence gives one number
    assert grounding.extract_time("The event starts at 30.\nIt ends at 12.") == [12.0, 30.0]
    assert grounding.extract_time("The event starts at 30 and ends at 12.") is None
    assert grounding.extract_time("It happens in 3.2s \u2013 5s", "videochat_flash") is None
    assert grounding.extract_time("It happens in 3.2s \u2013 5s", "lmms_eval") == [3.2, 5.0]
    assert grounding.extract_time("no numbers at all") is None
    assert grounding.iou([0, 10], [5, 15]) == pytest.approx(5 / 15)
    assert grounding.iou([3, 3], [3, 3]) == 0.0
    with pytest.raises(ValueError):
        grounding.extract_time("1 - 2", "nope")


def test_generic_layout_and_jsonl(tmp_path):
    ann = tmp_path / "ours.json"
    ann.write_text(json.dumps([
        {"id": "a", "video": "a.mp4", "query": "a person sits down", "start": 2.0, "end": 6.0},
        {"id": "b", "video": "b.mp4", "query": "a person stands up", "start": 1.0},
    ]))
    items, bad = grounding.load_grounding(ann)
    assert [i["id"] for i in items] == ["a"] and [(b["record"], b["field"]) for b in bad] == [("b", "end")]
    preds = tmp_path / "p.jsonl"
    preds.write_text('{"id": "a", "prediction": "The event happens in 2 - 5 seconds."}\n')
    out = grounding.BENCHMARKS["grounding"].score(items, grounding.read_predictions(preds))
    assert (out["R@0.3"], out["R@0.5"], out["R@0.7"], out["mIoU"]) == (100.0, 100.0, 100.0, 75.0)
    bad_file = tmp_path / "bad.json"
    bad_file.write_text("{")
    with pytest.raises(InputError, match="bad.json"):
        grounding.load_charades_sta(bad_file)
    assert grounding.BENCHMARKS["charades_sta"].format == "grounding"
