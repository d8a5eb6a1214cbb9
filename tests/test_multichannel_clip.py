"""The SSv2 fork's multi-channel CLIP tower (pipeline.vision.multichannel_clip) and its training augmentation and
segment sampling (pipeline.video.augment), on tiny random CLIPs (width 32, 32 px frames in 16 px patches: 4
patches a frame)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pipeline.video.augment import AUGMENTATIONS, VideoAugment, build_augment
from pipeline.video.frames import FrameSampling
from pipeline.vision.multichannel_clip import (
    IMAGENET_MEAN,
    MultiChannelCLIPTower,
    build_multichannel_clip,
    tower_state_dict,
)

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "image_size": 32, "patch_size": 16}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A saved tiny 3-channel HF CLIPVisionModel folder (what openai/clip-vit-large-patch14-336 is, shrunk)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_clip3")
    CLIPVisionModel(CLIPVisionConfig(**TINY)).save_pretrained(out)
    return out


def _pixels(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(frames, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _random_tower(clip_dir, layer=-2, seed=0, **extra) -> MultiChannelCLIPTower:
    torch.manual_seed(1)
    return build_multichannel_clip(str(clip_dir), None, layer, {**TINY, **extra}, seed).eval()


@torch.no_grad()
def test_16_frames_give_three_colour_planes_of_patch_tokens_and_32_frames_two_clips(clip_dir):
    tower = _random_tower(clip_dir)
    assert (tower.clip_frames, tower.dim, tower.grid, tower.num_patches, tower.heads) == (16, 32, (2, 2), 4, 2)
    assert tower.mean == IMAGENET_MEAN and tower.image_size == (32, 32)
    video = _pixels(32)
    one = tower(video[:16])
    assert one.shape == (3, 4, 32) and tower.out_frames(16) == 3
    # output frame c = colour plane c of the 16 frames as one 16-channel image, CLS dropped
    for colour in range(3):
        plane = video[:16, colour][None]  # (1, 16, H, W)
        torch.testing.assert_close(one[colour], tower.clip(plane).last_hidden_state[0, 1:])
    two = tower(video)
    assert two.shape == (6, 4, 32) and tower.out_frames(32) == 6
    torch.testing.assert_close(two[:3], one)
    torch.testing.assert_close(two[3:], tower(video[16:]))


@torch.no_grad()
def test_a_still_image_is_a_static_16_frame_video(clip_dir):
    tower = _random_tower(clip_dir)
    image = _pixels(1)
    out = tower(image)
    assert out.shape == (3, 4, 32) and tower.out_frames(1) == 3
    torch.testing.assert_close(out, tower(image.expand(16, -1, -1, -1)))
    for frames in (5, 17, 0):
        with pytest.raises(ValueError):
            tower.out_frames(frames)
    with pytest.raises(ValueError):
        tower(_pixels(5))


def test_the_patch_conv_reads_16_segments_from_its_seed_and_the_rest_is_clip_vision_models(clip_dir):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = _random_tower(clip_dir, layer=-1)
    conv = tower.clip.embeddings.patch_embedding
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (16, 32, (16, 16), None)
    assert tower.clip.config.num_channels == 16
    assert abs(conv.weight.std().item() - 0.02) < 0.005  # the fork's init: N(0, initializer_range)
    torch.testing.assert_close(_random_tower(clip_dir, layer=-1).clip.embeddings.patch_embedding.weight,
                               conv.weight)
    assert not torch.equal(_random_tower(clip_dir, layer=-1, seed=5).clip.embeddings.patch_embedding.weight,
                           conv.weight)
    # CLIPVisionModel's names, but post_layernorm's: it only reads the pooled CLS, which the tower never returns
    reference = [key for key in CLIPVisionModel(CLIPVisionConfig(**TINY)).state_dict() if "post_layernorm" not in key]
    assert list(tower.clip.state_dict()) == list(reference)
    assert list(tower.state_dict()) == ["clip." + key for key in reference]
    pruned = _random_tower(clip_dir, layer=-2)
    assert len(pruned.clip.encoder.layers) == 1 and pruned.blocks == 1
    one_block = CLIPVisionModel(CLIPVisionConfig(**{**TINY, "num_hidden_layers": 1})).state_dict()
    assert list(pruned.clip.state_dict()) == [key for key in one_block if "post_layernorm" not in key]
    assert _random_tower(clip_dir, num_segments=8).clip_frames == 8
    with pytest.raises(ValueError):
        _random_tower(clip_dir, layer=0)


@torch.no_grad()
def test_a_saved_hf_clip_gives_every_weight_but_the_patch_conv(clip_dir, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    tower = build_multichannel_clip(str(clip_dir), "openai", -2, {}, seed=3).eval()
    source = CLIPVisionModel.from_pretrained(clip_dir).state_dict()
    mine = tower.clip.state_dict()
    assert mine["embeddings.patch_embedding.weight"].shape == (32, 16, 16, 16)
    for key, value in mine.items():
        if key != "embeddings.patch_embedding.weight":
            torch.testing.assert_close(value, source[key])
    # the full 2-block model with the tower's conv copied in: hidden_states[-2] without CLS is the tower's output
    full = CLIPVisionModel(CLIPVisionConfig(**{**TINY, "num_channels": 16})).eval()
    full.load_state_dict({**source, "embeddings.patch_embedding.weight": mine["embeddings.patch_embedding.weight"]})
    video = _pixels(16)
    planes = video.transpose(0, 1)  # (3, 16, H, W): the fork's (C, T, H, W)
    expected = full(planes, output_hidden_states=True).hidden_states[-2][:, 1:]
    torch.testing.assert_close(tower(video), expected)
    # saved back: the 16-channel conv is kept, whatever the seed
    tower.clip.save_pretrained(tmp_path / "saved")
    again = build_multichannel_clip(str(tmp_path / "saved"), "local", -1, {}, seed=99).eval()
    torch.testing.assert_close(again.clip.embeddings.patch_embedding.weight, mine["embeddings.patch_embedding.weight"])
    torch.testing.assert_close(again(video), tower(video))


@torch.no_grad()
def test_fork_and_transformers_4_key_names_load(clip_dir):
    tower = _random_tower(clip_dir)
    other = _random_tower(clip_dir, seed=7)
    weights = tower.clip.state_dict()
    fork = {f"model.video_tower.vision_tower.vision_model.{k}": v for k, v in weights.items()}
    fork["model.image_tower.vision_tower.vision_model.embeddings.class_embedding"] = torch.zeros(32)
    fork["model.video_mm_projector.0.weight"] = torch.zeros(4, 32)
    fork["model.video_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"] = torch.zeros(64, 32)
    other.load_state_dict(other.tower_state_dict(fork))  # strict: exactly the tower's keys
    video = _pixels(16)
    torch.testing.assert_close(other(video), tower(video))
    v4 = {f"vision_model.{k}": v for k, v in weights.items()}
    renamed, expected = tower_state_dict(v4), tower.state_dict()
    assert list(renamed) == list(expected) and all(renamed[k] is weights[k[5:]] for k in renamed)


def test_gradients_reach_the_new_patch_conv(clip_dir):
    tower = _random_tower(clip_dir).train()
    tower(_pixels(16)).square().mean().backward()
    grad = tower.clip.embeddings.patch_embedding.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def _video(frames=16, height=40, width=56, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (frames, 3, height, width), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", ["fork", "torchvision"])
def test_augment_shape_dtype_and_reproducibility(impl):
    augment = VideoAugment(32, rand_augment_impl=impl, erase_prob=0.5)
    video = _video()
    out = augment(video, seed=1)
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(out, augment(video, seed=1))
    assert not torch.equal(out, augment(video, seed=2))
    a, b = (augment(video, generator=torch.Generator().manual_seed(4)) for _ in range(2))
    assert torch.equal(a, b)
    assert augment(_video(frames=1), seed=0).shape == (1, 3, 32, 32)


def test_augment_applies_one_set_of_parameters_to_every_frame():
    still = _video(frames=1).expand(8, -1, -1, -1).contiguous()  # 8 identical frames
    for seed in range(10):
        out = VideoAugment(32, erase_prob=0.0)(still, seed=seed)  # RandAugment, crop, flip
        assert all(torch.equal(out[0], frame) for frame in out[1:])
    # erasing: the same box on every frame (new noise in each), the crop and flip untouched
    clean = VideoAugment(32, erase_prob=0.0)(still, seed=3)
    erased = VideoAugment(32, erase_prob=1.0)(still, seed=3)
    changed = (erased != clean).any(dim=1)  # (T, H, W)
    boxes = {(tuple(torch.nonzero(m.any(1)).flatten()[[0, -1]].tolist()),
              tuple(torch.nonzero(m.any(0)).flatten()[[0, -1]].tolist())) for m in changed}
    assert len(boxes) == 1 and changed.any()
    assert not torch.equal(erased[0], erased[1])


def test_presets_are_picklable_and_named():
    assert set(AUGMENTATIONS) == {"none", "llava_ssv2", "llava_ssv2_noflip"}
    fork = build_augment("llava_ssv2", 32)
    assert (fork.rand_augment_ops, fork.rand_augment_magnitude, fork.magnitude_std, fork.flip_prob,
            fork.erase_prob, fork.crop_scale, fork.crop_ratio) == (4, 7.0, 0.5, 0.5, 0.25, (0.08, 1.0), (0.75, 1.3333))
    assert build_augment("llava_ssv2_noflip", 32).flip_prob == 0.0
    video = _video()
    copy = pickle.loads(pickle.dumps(fork))
    assert torch.equal(copy(video, seed=5), fork(video, seed=5))
    plain = build_augment("none", 32)
    assert plain(video).shape == (16, 3, 32, 32) and torch.equal(plain(video, seed=1), plain(video, seed=2))
    with pytest.raises(ValueError):
        build_augment("nope", 32)


def test_segment_sampling_midpoints_without_rng_random_offsets_with_rng():
    total, segments = 50, 16
    sampling = FrameSampling("midpoints", segments)
    mid = sampling.indices(total)
    assert mid.dtype == np.int64 and mid.shape == (16,)
    starts, ends = np.arange(16) * total / 16, (np.arange(16) + 1) * total / 16
    assert np.all((mid >= starts) & (mid < ends))
    length = total // segments  # the fork's segments: 3 frames from frame 0, frames 48, 49 never drawn
    draws = [sampling.indices(total, rng=np.random.default_rng(seed)) for seed in range(20)]
    for idx in draws:
        assert np.all((idx >= np.arange(16) * length) & (idx < (np.arange(16) + 1) * length))
    np.testing.assert_array_equal(draws[0], sampling.indices(total, rng=np.random.default_rng(0)))
    assert len({tuple(d) for d in draws}) > 1 and {int(v) for d in draws for v in d - np.arange(16) * 3} == {0, 1, 2}
    short = sampling.indices(10, rng=np.random.default_rng(0))  # shorter than the segments: the middles, in order
    assert short.shape == (16,) and short.min() == 0 and short.max() == 9 and np.all(np.diff(short) >= 0)
