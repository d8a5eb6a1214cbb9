"""Padding-free packing (``packing: true``): a batch packed into one row gives every token the logits and loss it
has in the padded batch, and attention never crosses samples."""

import math

import pytest
import torch
from conftest import run_stage_process, stage_settings

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX
from pipeline.data.dataset import VideoCollator
from pipeline.io import read_table
from pipeline.model.connectors import build_connector
from pipeline.model.video_llm import VideoLLM, load_llm
from pipeline.train.config import StageConfig, resolve_stage

DIM = 6  # the vision tokens' width


def _item(generator: torch.Generator, text: int, video: int, vocab: int) -> dict:
    """A sample of ``video`` video positions after a 3-token prompt, then ``text`` tokens, the last half trained."""
    ids = torch.randint(1, vocab, (3 + video + text,), generator=generator)
    ids[3:3 + video] = VIDEO_TOKEN_INDEX
    labels = ids.masked_fill(torch.arange(len(ids)) < len(ids) - text // 2, IGNORE_INDEX)
    return {"id": f"r{text}", "input_ids": ids, "labels": labels, "layouts": [(1, video - 1)] if video else [],
            "video_features": torch.randn(video, DIM, generator=generator)}


def _batch(vocab: int, seed: int = 0) -> list[dict]:
    """Three samples of different lengths, two with video tokens."""
    generator = torch.Generator().manual_seed(seed)
    return [_item(generator, 9, 5, vocab), _item(generator, 4, 0, vocab), _item(generator, 14, 3, vocab)]


def _tiny_qwen2(folder):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    Qwen2ForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(params=["llama", "qwen2"])
def model(request, tiny_llm_dir, tmp_path) -> VideoLLM:
    """A tiny random Llama (SmolLM2's vocabulary) or Qwen2 in float32 with SDPA (the CPU's attention), and a linear
    connector from DIM."""
    folder = tiny_llm_dir if request.param == "llama" else _tiny_qwen2(tmp_path / "qwen2")
    llm = load_llm(str(folder), torch.float32)
    assert llm.config._attn_implementation == "sdpa"
    torch.manual_seed(1)
    return VideoLLM(llm, build_connector("linear", DIM, llm.config.hidden_size)).eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(rows, L - 1)`` float32 next-token cross-entropy, 0 where the target is ignored."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:],
                                             ignore_index=IGNORE_INDEX, reduction="none")


def _segments(packed: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    """The packed row ``(1, sum L_i, ...)`` cut into its samples."""
    return list(packed[0].split(lengths))


def test_the_collator_packs_a_batch_into_one_row_with_positions_per_sample():
    batch = _batch(50)
    lengths = [len(item["input_ids"]) for item in batch]
    packed, padded = VideoCollator(0, packing=True)(batch), VideoCollator(0)(batch)
    assert set(packed) == {"input_ids", "labels", "position_ids", "visual_layout", "video_features"}
    assert packed["input_ids"].shape == packed["labels"].shape == packed["position_ids"].shape == (1, sum(lengths))
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    for i, (ids, labels) in enumerate(zip(_segments(packed["input_ids"], lengths),
                                          _segments(packed["labels"], lengths))):
        assert torch.equal(ids, padded["input_ids"][i, :lengths[i]])
        assert labels[0] == IGNORE_INDEX and torch.equal(labels[1:], padded["labels"][i, 1:lengths[i]])
    for key in ("visual_layout", "video_features"):
        assert torch.equal(packed[key], padded[key])
    # the Trainer counts labels[..., 1:] as the loss's tokens: the same count packed and padded
    assert (packed["labels"][:, 1:] != IGNORE_INDEX).sum() == (padded["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_packed_per_token_logits_and_losses_equal_the_padded_batch(model):
    batch = _batch(model.config.vocab_size)
    lengths = [len(item["input_ids"]) for item in batch]
    padded, packed = VideoCollator(0)(batch), VideoCollator(0, packing=True)(batch)
    with torch.no_grad():
        out_padded, out_packed = model(**padded), model(**packed)
    padded_losses = _token_losses(out_padded.logits, padded["labels"])
    packed_losses = _token_losses(out_packed.logits, packed["labels"])
    worst = {"logits": 0.0, "loss": 0.0}
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    for i, (start, n) in enumerate(zip(starts, lengths)):
        logits = out_packed.logits[0, start:start + n]
        worst["logits"] = max(worst["logits"], float((logits - out_padded.logits[i, :n]).abs().max()))
        # the sample's n - 1 next-token losses; the one after its last token (the next sample's first) is ignored
        worst["loss"] = max(worst["loss"], float((packed_losses[0, start:start + n - 1]
                                                  - padded_losses[i, :n - 1]).abs().max()))
        assert packed_losses[0, start + n - 1:start + n].abs().sum() == 0
    assert worst["logits"] < 1e-5 and worst["loss"] < 1e-5, worst
    assert abs(float(out_packed.loss) - float(out_padded.loss)) < 1e-5
    items = (padded["labels"][:, 1:] != IGNORE_INDEX).sum()  # as the Trainer passes it: the summed loss / items
    with torch.no_grad():
        summed = model(**padded, num_items_in_batch=items).loss, model(**packed, num_items_in_batch=items).loss
    assert abs(float(summed[0]) - float(summed[1])) < 1e-5


def test_attention_never_crosses_the_packed_samples(model):
    vocab = model.config.vocab_size
    batch = _batch(vocab)
    lengths = [len(item["input_ids"]) for item in batch]
    changed = [_batch(vocab, seed=7)[0], *batch[1:]]  # another first sample, as long, other tokens and features
    assert len(changed[0]["input_ids"]) == lengths[0]
    assert not torch.equal(changed[0]["input_ids"], batch[0]["input_ids"])
    with torch.no_grad():
        before = _segments(model(**VideoCollator(0, packing=True)(batch)).logits, lengths)
        after = _segments(model(**VideoCollator(0, packing=True)(changed)).logits, lengths)
        flat = VideoCollator(0, packing=True)(changed)
        flat["position_ids"] = torch.arange(sum(lengths))[None]  # one long sequence: attention crosses
        crossing = _segments(model(**flat).logits, lengths)
    assert not torch.allclose(before[0], after[0], atol=1e-3)
    for i in (1, 2):
        assert torch.allclose(before[i], after[i], atol=1e-6), float((before[i] - after[i]).abs().max())
        assert not torch.allclose(before[i], crossing[i], atol=1e-3)


def test_packing_is_a_stage_key_and_not_with_matching():
    config = {"llm": {"name_or_path": "m", "template": "chatml"}, "model": {"mm_projector_type": "linear"},
              "stages": [{"name": "a", "init": None, "train": {"connector": "full", "llm": "frozen"},
                          "packing": True}]}
    assert resolve_stage(config, "a")["packing"] is True
    assert StageConfig(name="s", template="chatml").packing is False
    with pytest.raises(ValueError, match="packing: matching takes one sample a row"):
        StageConfig(name="s", template="chatml", packing=True, matching={})


def test_a_packing_stage_trains(tmp_path, tiny_llm_dir, train_data):
    """Two optimizer steps of the projector on packed batches (without DeepSpeed, to stay quick)."""
    config = stage_settings(tmp_path, tiny_llm_dir, train_data, "s", packing=True, max_steps=2, deepspeed=None,
                            report_to=[])
    done = run_stage_process(tmp_path, config)
    assert done.returncode == 0, done.stderr[-3000:]
    loss = read_table(tmp_path / "s" / "loss.tsv")
    assert len(loss) == 2 and loss["loss"].astype(float).map(math.isfinite).all()
    assert (loss["tokens_per_second"].astype(float) > 0).all()
    assert (tmp_path / "s" / "model" / "mm_projector.safetensors").exists()
