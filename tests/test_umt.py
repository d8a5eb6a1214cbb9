"""UMT-L (pipeline.vision.umt) on a tiny config: shapes, upstream's checkpoint names and layout, clip attention,
position embeddings, gradients.

The expected names and the reference forward below are written from VideoChat-Flash's
``llava-train_videochat/llava/model/multimodal_encoder/umt/vit.py`` (its ``origin`` attention path, vit.py:97-108),
not from the module under test, so that the test fails if either drifts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.vision.tower import VisionTower
from pipeline.vision.umt import (
    UMTConfig,
    UMTVisionTower,
    build_umt,
    load_umt_weights,
    position_embedding,
    sincos_table,
)

TINY = {"dim": 32, "depth": 2, "heads": 2, "image_size": 32, "patch_size": 16}

# vit.py:117-145 (Block), 51-112 (Attention: qkv without bias, q_bias, v_bias, proj), 33-49 (Mlp)
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias")


def expected_keys(blocks: int) -> set[str]:
    """PretrainVisionTransformer's state_dict: ``encoder.`` (vit.py:370), patch_embed.proj (vit.py:160), the built
    blocks (vit.py:296), vision_layernorm (vit.py:304); no position embedding (sin-cos, not a parameter)."""
    keys = {"encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias",
            "encoder.vision_layernorm.weight", "encoder.vision_layernorm.bias"}
    return keys | {f"encoder.blocks.{i}.{name}" for i in range(blocks) for name in BLOCK_KEYS}


def tiny(layer: int = -2, seed: int = 0, **overrides) -> UMTVisionTower:
    return build_umt("umt-l", None, layer, {**TINY, **overrides}, seed)


def perturbed(tower: UMTVisionTower, seed: int = 1) -> UMTVisionTower:
    """Non-trivial values everywhere (upstream's init has zero biases and unit LayerNorms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return tower


def frames(t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference(tower: UMTVisionTower, pixels: torch.Tensor, clip: int) -> torch.Tensor:
    """Upstream's forward from the state dict (vit.py:315-334, 413-419), ``(T, 3, H, W) -> (T, S, D)``."""
    s = tower.state_dict()
    cfg = tower.config
    d, h, p = cfg.dim, cfg.heads, cfg.patch_size
    t = pixels.shape[0]
    x = pixels.reshape(t // clip, clip, 3, *pixels.shape[2:]).permute(0, 2, 1, 3, 4)  # umt_encoder.py:177
    x = F.conv3d(x, s["encoder.patch_embed.proj.weight"], s["encoder.patch_embed.proj.bias"], stride=(1, p, p))
    x = x.flatten(2).transpose(1, 2)
    x = x + (tower.encoder.img_pos_embed if clip == 1 else tower.encoder.pos_embed)
    b, n, _ = x.shape
    for i in range(cfg.depth + cfg.layer + 1):  # vit.py:275
        k = f"encoder.blocks.{i}."
        y = F.layer_norm(x, (d,), s[k + "norm1.weight"], s[k + "norm1.bias"], eps=1e-6)
        bias = torch.cat((s[k + "attn.q_bias"], torch.zeros(d), s[k + "attn.v_bias"]))
        qkv = F.linear(y, s[k + "attn.qkv.weight"], bias).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] * (d // h) ** -0.5) @ qkv[1].transpose(-2, -1)).softmax(-1)
        y = (attn @ qkv[2]).transpose(1, 2).reshape(b, n, d)
        x = x + F.linear(y, s[k + "attn.proj.weight"], s[k + "attn.proj.bias"])
        y = F.layer_norm(x, (d,), s[k + "norm2.weight"], s[k + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, s[k + "mlp.fc1.weight"], s[k + "mlp.fc1.bias"])),
                     s[k + "mlp.fc2.weight"], s[k + "mlp.fc2.bias"])
        x = x + y
    x = F.layer_norm(x, (d,), s["encoder.vision_layernorm.weight"], s["encoder.vision_layernorm.bias"], eps=1e-12)
    return x.reshape(t, -1, d)


def upstream_checkpoint(tower: UMTVisionTower, path, extra_blocks: int = 1) -> None:
    """Save ``tower`` as UMT-L_f4_vision.pt is laid out: ``encoder.norm`` (renamed by umt_encoder.py:122-123), the
    blocks a pruned tower lacks, and keys outside ``encoder.`` that the loader drops."""
    state = {k.replace("encoder.vision_layernorm", "encoder.norm"): v for k, v in tower.state_dict().items()}
    kept = tower.config.kept_blocks
    for i in range(kept, kept + extra_blocks):
        state.update({f"encoder.blocks.{i}.{k[len('encoder.blocks.0.'):]}": torch.randn_like(v)
                      for k, v in state.items() if k.startswith("encoder.blocks.0.")})
    state["clip_decoder.0.head.weight"] = torch.randn(4, 4)
    state["clip_pos_embed"] = torch.randn(1, 4, 4)
    torch.save(state, path)


def test_config_defaults_are_umt_l():
    cfg = UMTConfig()
    assert (cfg.image_size, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio) == (224, 16, 1024, 24, 16, 4)
    assert (cfg.num_frames, cfg.tubelet_size, cfg.layer, cfg.qkv_bias, cfg.init_values) == (4, 1, -2, True, 0)
    assert cfg.kept_blocks == 23
    assert UMTConfig(image_size=448).grid == 28
    with pytest.raises(ValueError, match="layer"):
        UMTConfig(layer=0)


def test_shapes_video_and_image():
    tower = tiny().eval()
    assert isinstance(tower, VisionTower)
    assert (tower.dim, tower.grid, tower.clip_frames, tower.image_size, tower.heads) == (32, (2, 2), 4, (32, 32), 2)
    assert tower.mean == (0.485, 0.456, 0.406) and tower.std == (0.229, 0.224, 0.225)
    assert len(tower.encoder.blocks) == 1  # depth 2, layer -2: the last block is never built
    with torch.no_grad():
        assert tower(frames(8)).shape == (8, 4, 32)
        assert tower(frames(1)).shape == (1, 4, 32)
    with pytest.raises(ValueError, match="multiple of 4"):
        tower(frames(6))
    with pytest.raises(ValueError, match="expected"):
        tower(frames(4, size=48))


def test_output_dtype_follows_input():
    tower = tiny().eval()
    with torch.no_grad():
        assert tower(frames(4).double()).dtype == torch.float64
        tower = tower.bfloat16()
        out = tower(frames(4).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_matches_upstream_math():
    tower = perturbed(tiny(layer=-1)).eval()
    with torch.no_grad():
        for t, clip in ((8, 4), (1, 1)):
            x = frames(t)
            torch.testing.assert_close(tower(x), reference(tower, x, clip), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", [-1, -2])
def test_state_dict_keys_are_upstreams(layer):
    tower = tiny(layer=layer)
    assert set(tower.state_dict()) == expected_keys(2 + layer + 1)
    s = tower.state_dict()
    assert s["encoder.patch_embed.proj.weight"].shape == (32, 3, 1, 16, 16)  # Conv3d, tubelet 1 (vit.py:160-164)
    assert s["encoder.blocks.0.attn.qkv.weight"].shape == (96, 32)
    assert s["encoder.blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert tower.encoder.vision_layernorm.eps == 1e-12 and tower.encoder.blocks[0].norm1.eps == 1e-6


def test_load_upstream_checkpoint(tmp_path):
    source = perturbed(tiny(seed=0)).eval()
    path = tmp_path / "UMT-L_f4_vision.pt"
    upstream_checkpoint(source, path)
    target = tiny(seed=5).eval()
    load_umt_weights(target, str(path))
    built = build_umt("umt-l", str(path), -2, TINY, seed=7).eval()
    x = frames(8)
    with torch.no_grad():
        want = source(x)
        assert torch.equal(target(x), want)
        assert torch.equal(built(x), want)


def test_mismatched_checkpoint_names_file_and_keys(tmp_path):
    source = tiny()
    state = {k.replace("encoder.vision_layernorm", "encoder.norm"): v for k, v in source.state_dict().items()}
    missing = dict(state)
    del missing["encoder.blocks.0.attn.q_bias"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"missing\.pt.*missing keys: encoder\.blocks\.0\.attn\.q_bias"):
        load_umt_weights(tiny(), str(tmp_path / "missing.pt"))
    extra = {**state, "encoder.blocks.7.norm1.weight": torch.ones(32)}  # beyond depth: not a pruned block
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"extra\.pt.*unexpected keys: encoder\.blocks\.7\.norm1\.weight"):
        load_umt_weights(tiny(), str(tmp_path / "extra.pt"))
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"wide\.pt.*shape mismatches"):
        load_umt_weights(tiny(dim=64), str(tmp_path / "wide.pt"))


def test_sincos_table():
    table = sincos_table(3, 4)  # [sin p, cos p, sin p/100, cos p/100] (vit.py:181, 192-193)
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    p = torch.tensor(2.0)
    torch.testing.assert_close(table[2], torch.stack([p.sin(), p.cos(), (p / 100).sin(), (p / 100).cos()]))


def test_position_embedding_resizing():
    plain = sincos_table(4 * 14 * 14, 32)[None]
    assert torch.equal(position_embedding(4, 14, 32, 4, 14), plain)  # UMT-L at 224 px: no resize
    hd = position_embedding(4, 28, 32, 4, 14)  # umt-hd-large: 14 x 14 -> 28 x 28 per frame
    assert hd.shape == (1, 4 * 784, 32) and torch.isfinite(hd).all()
    assert position_embedding(1, 28, 32, 1, 14).shape == (1, 784, 32)
    one = position_embedding(1, 14, 32, 4, 14)  # linear in time, 4 -> 1: the midpoint of frames 1 and 2
    frames_ = plain.reshape(4, 196, 32)
    torch.testing.assert_close(one[0], (frames_[1] + frames_[2]) / 2)


def test_other_image_size_loads_and_runs(tmp_path):
    path = tmp_path / "ckpt.pt"
    upstream_checkpoint(perturbed(tiny()), path)
    tower = build_umt("umt-l", str(path), -2, TINY, seed=0, image_size=64).eval()
    assert tower.encoder.pos_embed.shape == (1, 4 * 16, 32) and tower.grid == (4, 4)
    with torch.no_grad():
        out = tower(frames(8, size=64))
        image = tower(frames(1, size=64))
    assert out.shape == (8, 16, 32) and image.shape == (1, 16, 32)
    assert torch.isfinite(out).all() and torch.isfinite(image).all()
    hd = build_umt("umt-hd-large", None, -1, {"dim": 32, "depth": 1, "heads": 2}, seed=0, image_size=None)
    assert hd.image_size == (448, 448) and hd.encoder.pos_embed.shape == (1, 4 * 784, 32)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_kept_parameter(checkpointing):
    tower = perturbed(tiny(layer=-1)).train()
    tower.gradient_checkpointing = checkpointing
    tower(frames(8)).square().sum().backward()
    for name, p in tower.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_checkpointing_gives_same_gradients():
    grads = []
    for checkpointing in (False, True):
        tower = perturbed(tiny(layer=-1)).train()
        tower.gradient_checkpointing = checkpointing
        tower(frames(4)).square().sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_frames_attend_within_their_clip_only():
    tower = perturbed(tiny()).eval()
    x = frames(8)
    y = x.clone()
    y[1] += 1.0
    with torch.no_grad():
        a, b = tower(x), tower(y)
    assert not torch.allclose(a[0], b[0])  # frame 0 sees frame 1 (same clip)
    assert torch.equal(a[4:], b[4:])  # the second clip does not


def test_qkv_module_is_called():
    """A LoRA adapter wraps ``qkv``: the forward must go through the module, not read its weight."""
    tower = perturbed(tiny()).eval()
    x = frames(4)
    with torch.no_grad():
        before = tower(x)
        handle = tower.encoder.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: out + 1.0)
        after = tower(x)
        handle.remove()
    assert not torch.allclose(before, after)


def test_lora_with_peft():
    peft = pytest.importorskip("peft")
    tower = perturbed(tiny())
    lora = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                           target_modules=r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")
    model = peft.get_peft_model(tower, lora)
    x = frames(4)
    model(x).square().sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert len(trained) == 2 * 4  # A and B of qkv, proj, fc1, fc2 in the one kept block
