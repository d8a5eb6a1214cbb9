"""EVA-ViT-G (pipeline.vision.eva) on a tiny config: shapes, ``layer``, the released checkpoint's names and layout,
position-embedding resizing, gradients, the ``eva_vit_g_qformer`` hand-off.

The expected names and the reference forward below are written from Video-LLaMA's ``video_llama/models/eva_vit.py``
(read at commit 64888c0; Attention eva_vit.py:118-148, Block :173-180, Mlp :54-61, VisionTransformer
.forward_features :324-340, interpolate_pos_embed :373-394), not from the module under test, so that the test fails
if either drifts.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pipeline.vision import build_tower
from pipeline.vision.eva import (
    BLIP2_MEAN,
    BLIP2_STD,
    EVAConfig,
    EVAVisionTower,
    build_eva,
    load_eva_weights,
    resize_pos_embed,
)
from pipeline.vision.tower import VisionTower

TINY = {"width": 32, "depth": 3, "heads": 2, "patch_size": 8, "image_size": 32}

# eva_vit.py:151-171 (Block: norm1, attn, norm2, mlp), 64-116 (Attention: qkv without bias, q_bias, v_bias, proj),
# 44-52 (Mlp: fc1, fc2); no gamma_1/gamma_2 (init_values None, eva_vit.py:167-171) and no relative position bias
BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias")


def expected_keys(blocks: int) -> set[str]:
    """VisionTransformer's state_dict (eva_vit.py:259-283): patch_embed.proj, cls_token, pos_embed, the blocks."""
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    return keys | {f"blocks.{i}.{name}" for i in range(blocks) for name in BLOCK_KEYS}


def tiny(layer: int = -1, seed: int = 0, **overrides) -> EVAVisionTower:
    return build_eva("eva_vit_g", None, layer, {**TINY, **overrides}, seed)


def perturbed(tower: EVAVisionTower, seed: int = 1) -> EVAVisionTower:
    """Non-trivial values everywhere (the initialisation has zero biases and unit LayerNorms)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return tower


def frames(t: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference_attention(s: dict, k: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """eva_vit.py:118-148: ``F.linear`` with the bias ``(q_bias, 0, v_bias)``, ``q * head_dim ** -0.5``, softmax."""
    b, n, d = x.shape
    bias = torch.cat((s[k + "attn.q_bias"], torch.zeros_like(s[k + "attn.v_bias"]), s[k + "attn.v_bias"]))
    qkv = F.linear(x, s[k + "attn.qkv.weight"], bias).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, key, v = qkv[0], qkv[1], qkv[2]
    attn = ((q * (d // heads) ** -0.5) @ key.transpose(-2, -1)).softmax(dim=-1)
    return F.linear((attn @ v).transpose(1, 2).reshape(b, n, d), s[k + "attn.proj.weight"], s[k + "attn.proj.bias"])


def reference_block(s: dict, i: int, x: torch.Tensor, heads: int) -> torch.Tensor:
    """Block ``i`` (eva_vit.py:173-180, 54-61): pre-norm, LayerNorm eps 1e-6 (eva_vit.py:426), exact GELU."""
    k, d = f"blocks.{i}.", x.shape[-1]
    x = x + reference_attention(s, k, F.layer_norm(x, (d,), s[k + "norm1.weight"], s[k + "norm1.bias"], eps=1e-6),
                                heads)
    y = F.layer_norm(x, (d,), s[k + "norm2.weight"], s[k + "norm2.bias"], eps=1e-6)
    y = F.linear(F.gelu(F.linear(y, s[k + "mlp.fc1.weight"], s[k + "mlp.fc1.bias"])), s[k + "mlp.fc2.weight"],
                 s[k + "mlp.fc2.bias"])
    return x + y


def reference(s: dict, pixels: torch.Tensor, blocks: int, heads: int, patch: int) -> torch.Tensor:
    """``forward_features`` (eva_vit.py:324-340) through ``blocks`` blocks of state dict ``s``: ``(T, 1 + S, D)``."""
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat((s["cls_token"].expand(x.shape[0], -1, -1), x), dim=1) + s["pos_embed"]
    for i in range(blocks):
        x = reference_block(s, i, x, heads)
    return x


def released_file(path, blocks: int = 3, width: int = 32, grid: int = 4, patch: int = 8, mlp: int = 139,
                  seed: int = 3, dtype=torch.float16, **extra) -> dict:
    """A file laid out as eva_vit_g.pth: a flat dict under the original names, every block of the released model
    (40 for EVA-ViT-G, ``blocks`` here), half precision; returns the tensors as float32."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + grid * grid, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,)}
    block = {"norm1.weight": (width,), "norm1.bias": (width,), "attn.q_bias": (width,), "attn.v_bias": (width,),
             "attn.qkv.weight": (3 * width, width), "attn.proj.weight": (width, width), "attn.proj.bias": (width,),
             "norm2.weight": (width,), "norm2.bias": (width,), "mlp.fc1.weight": (mlp, width), "mlp.fc1.bias": (mlp,),
             "mlp.fc2.weight": (width, mlp), "mlp.fc2.bias": (width,)}
    assert set(block) == set(BLOCK_KEYS)
    shapes.update({f"blocks.{i}.{k}": v for i in range(blocks) for k, v in block.items()})
    state = {k: (0.3 * torch.randn(v, generator=gen) + (1.0 if k.endswith("norm1.weight") or
                                                         k.endswith("norm2.weight") else 0.0)).to(dtype)
             for k, v in shapes.items()}
    state.update(extra)
    torch.save(state, path)
    return {k: v.float() for k, v in state.items()}


def test_config_defaults_are_blip2s_eva_vit_g():
    cfg = EVAConfig()
    assert (cfg.image_size, cfg.patch_size, cfg.width, cfg.heads, cfg.mlp_ratio) == (224, 14, 1408, 16, 4.3637)
    assert (cfg.depth, cfg.layer, cfg.kept_blocks, cfg.grid) == (40, -2, 39, 16)  # eva_vit.py:421: 39 built
    assert (cfg.qkv_bias, cfg.norm_eps, cfg.drop_path_rate) == (True, 1e-6, 0.0)
    assert EVAConfig(layer=-1).kept_blocks == 40  # E.T. Chat's vision_output_layer -1: 40 + (-1) + 1
    with pytest.raises(ValueError, match="layer"):
        EVAConfig(layer=0)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        EVAConfig(image_size=230)


def test_full_size_layout_on_meta():
    """EVA-ViT-G's tensors as BLIP-2 builds it (39 blocks), without allocating its ~1B parameters."""
    with torch.device("meta"):
        tower = EVAVisionTower(EVAConfig())
    s = tower.state_dict()
    assert set(s) == expected_keys(39)
    assert s["pos_embed"].shape == (1, 257, 1408) and s["cls_token"].shape == (1, 1, 1408)
    assert s["patch_embed.proj.weight"].shape == (1408, 3, 14, 14)
    assert s["blocks.0.attn.qkv.weight"].shape == (3 * 1408, 1408)
    assert s["blocks.0.mlp.fc1.weight"].shape == (6144, 1408)  # int(1408 * 4.3637)
    assert (tower.dim, tower.grid, tower.num_patches, tower.heads) == (1408, (16, 16), 256, 16)
    assert sum(p.numel() for p in tower.parameters()) == 985_894_528


def test_shapes_and_attributes():
    tower = tiny().eval()
    assert isinstance(tower, VisionTower)
    assert (tower.dim, tower.grid, tower.clip_frames, tower.image_size, tower.heads) == (32, (4, 4), 1, (32, 32), 2)
    assert tower.mean == BLIP2_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert tower.std == BLIP2_STD == (0.26862954, 0.26130258, 0.27577711)
    assert tower.out_frames(5) == 5
    with torch.no_grad():
        hidden = tower.hidden(frames(5))
        assert hidden.shape == (5, 17, 32)
        assert torch.equal(tower(frames(5)), hidden[:, 1:])
        assert tower(frames(1)).shape == (1, 16, 32)
    with pytest.raises(ValueError, match="expected"):
        tower(frames(2, size=48))
    with pytest.raises(ValueError, match="expected"):
        tower(frames(2)[:, :2])


def test_matches_upstream_math():
    tower = perturbed(tiny()).eval()
    x = frames(3)
    with torch.no_grad():
        want = reference(tower.state_dict(), x, 3, 2, 8)
        torch.testing.assert_close(tower.hidden(x), want, atol=1e-5, rtol=1e-5)


def test_attention_equals_hand_written_reference():
    """timm's EvaAttention (fused qkv, q_bias/v_bias, zero k bias) against eva_vit.py:118-148."""
    tower = perturbed(tiny()).eval()
    attn = tower.blocks[0].attn
    assert torch.equal(attn.k_bias, torch.zeros(32)) and "attn.k_bias" not in tower.blocks[0].state_dict()
    x = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), reference_attention(tower.state_dict(), "blocks.0.", x, 2),
                                   atol=1e-5, rtol=1e-5)
    assert isinstance(tower.blocks[0].mlp.act, torch.nn.GELU) and tower.blocks[0].mlp.act.approximate == "none"
    assert tower.blocks[0].norm1.eps == tower.blocks[0].norm2.eps == 1e-6


@pytest.mark.parametrize("layer", [-1, -2, -3])
def test_layer_selects_the_block_and_prunes_the_rest(layer):
    source = perturbed(tiny(layer=-1)).eval()
    tower = tiny(layer=layer).eval()
    kept = 3 + layer + 1
    assert len(tower.blocks) == kept and set(tower.state_dict()) == expected_keys(kept)
    tower.load_state_dict({k: v for k, v in source.state_dict().items() if k in tower.state_dict()})
    x = frames(2)
    with torch.no_grad():
        by_hand = torch.cat((source.cls_token.expand(2, -1, -1), source.patch_embed(x)), dim=1) + source.pos_embed
        for block in source.blocks[:kept]:  # -2: the output of block depth - 1 = 2 of 3
            by_hand = block(by_hand)
        assert torch.equal(tower.hidden(x), by_hand)


def test_load_released_layout(tmp_path):
    path = tmp_path / "eva_vit_g.pth"
    state = released_file(path)
    tower = tiny(layer=-1).eval()
    x = frames(2)
    with torch.no_grad():
        before = tower.hidden(x)
        load_eva_weights(tower, str(path))
        after = tower.hidden(x)
    assert not torch.allclose(before, after)
    assert all(torch.equal(v, state[k]) for k, v in tower.state_dict().items())  # fp16 values, cast to float32
    torch.testing.assert_close(after, reference(state, x, 3, 2, 8), atol=1e-5, rtol=1e-5)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": torch.load(path, weights_only=True)}, wrapped)
    built = build_tower("eva", "eva_vit_g", str(wrapped), -1, TINY, seed=9).eval()
    with torch.no_grad():
        assert torch.equal(built.hidden(x), after)


def test_last_block_of_the_file_is_dropped(tmp_path):
    """BLIP-2: a 40-block file into 39 built blocks (layer -2); here 3 blocks into 2."""
    path = tmp_path / "eva_vit_g.pth"
    state = released_file(path, blocks=3, seed=3)
    other = tmp_path / "other_last_block.pth"
    released_file(other, blocks=3, seed=4, **{k: v.half() for k, v in state.items() if not k.startswith("blocks.2.")})
    tower = tiny(layer=-2).eval()
    load_eva_weights(tower, str(path))
    assert len(tower.blocks) == 2 and not any(k.startswith("blocks.2.") for k in tower.state_dict())
    twin = tiny(layer=-2).eval()
    load_eva_weights(twin, str(other))  # differs from `path` in block 2 only
    x = frames(2)
    with torch.no_grad():
        assert torch.equal(tower.hidden(x), twin.hidden(x))
        torch.testing.assert_close(tower.hidden(x), reference(state, x, 2, 2, 8), atol=1e-5, rtol=1e-5)


def test_eva_clip_heads_are_ignored(tmp_path):
    path = tmp_path / "with_heads.pth"
    state = released_file(path, **{"norm.weight": torch.ones(32), "norm.bias": torch.zeros(32),
                                   "head.weight": torch.zeros(8, 32)})
    tower = tiny().eval()
    load_eva_weights(tower, str(path))
    assert all(torch.equal(v, state[k]) for k, v in tower.state_dict().items())


def test_mismatched_files_name_the_file(tmp_path):
    released_file(tmp_path / "wide.pth", width=64)
    with pytest.raises(ValueError, match=r"wide\.pth.*shape mismatches: blocks\.0\..*\(64"):
        load_eva_weights(tiny(), str(tmp_path / "wide.pth"))
    state = released_file(tmp_path / "ok.pth")
    del state["blocks.1.attn.q_bias"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth.*missing keys: blocks\.1\.attn\.q_bias"):
        load_eva_weights(tiny(), str(tmp_path / "missing.pth"))
    released_file(tmp_path / "deeper.pth", blocks=4)  # block 3 is beyond depth 3: not a pruned block
    with pytest.raises(ValueError, match=r"deeper\.pth.*unexpected keys: blocks\.3\."):
        load_eva_weights(tiny(), str(tmp_path / "deeper.pth"))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth.*not an EVA checkpoint"):
        load_eva_weights(tiny(), str(tmp_path / "list.pth"))


def test_position_embedding_resized_on_load(tmp_path):
    from timm.layers import resample_abs_pos_embed  # an independent implementation of the same resize

    path = tmp_path / "eva_vit_g.pth"
    state = released_file(path)  # 32 px: a 4 x 4 grid
    tower = build_eva("eva_vit_g", str(path), -1, TINY, seed=0, image_size=48).eval()  # 6 x 6
    assert tower.grid == (6, 6) and tower.image_size == (48, 48) and tower.pos_embed.shape == (1, 37, 32)
    want = resample_abs_pos_embed(state["pos_embed"], new_size=[6, 6], old_size=[4, 4], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False)
    torch.testing.assert_close(tower.pos_embed.data, want)
    assert torch.equal(tower.pos_embed[:, 0], state["pos_embed"][:, 0])
    with torch.no_grad():
        out = tower.hidden(frames(2, size=48))
    assert out.shape == (2, 37, 32) and torch.isfinite(out).all()
    same = resize_pos_embed(state["pos_embed"], 4)
    assert torch.equal(same, state["pos_embed"])
    flat = resize_pos_embed(torch.ones(1, 17, 8), 7)
    torch.testing.assert_close(flat, torch.ones(1, 50, 8))
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.ones(1, 16, 8), 4)


def test_build_tower_is_deterministic_and_leaves_the_callers_stream():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_tower("eva", "eva_vit_g", None, -1, TINY, seed=5)
    assert torch.equal(torch.rand(1), before)
    b = build_tower("eva", "eva_vit_g", None, -1, TINY, seed=5)
    c = build_tower("eva", "eva_vit_g", None, -1, TINY, seed=6)
    assert isinstance(a, EVAVisionTower) and a.training and all(p.requires_grad for p in a.parameters())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()["blocks.0.attn.qkv.weight"], c.state_dict()["blocks.0.attn.qkv.weight"])
    with torch.no_grad():
        assert torch.equal(a.eval()(frames(2)), b.eval()(frames(2)))


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown model"):
        build_eva("eva_vit_l", None, -2, TINY, 0)
    with pytest.raises(ValueError, match=r"unknown config fields \['dim'\]"):
        build_eva("eva_vit_g", None, -2, {**TINY, "dim": 8}, 0)
    with pytest.raises(ValueError, match="layer is its own argument"):
        build_eva("eva_vit_g", None, -2, {**TINY, "layer": -1}, 0)
    with pytest.raises(ValueError, match="'qformer' is for model 'eva_vit_g_qformer'"):
        build_eva("eva_vit_g", None, -2, {**TINY, "qformer": {}}, 0)


def test_qformer_model_hands_the_eva_tower_on(monkeypatch):
    calls = []

    def build_qformer_tower(base, overrides, seed):
        calls.append((base, overrides, seed))
        return base

    fake = types.ModuleType("pipeline.vision.qformer_tower")
    fake.build_qformer_tower = build_qformer_tower
    monkeypatch.setitem(sys.modules, "pipeline.vision.qformer_tower", fake)
    out = build_tower("eva", "eva_vit_g_qformer", None, -2, {**TINY, "qformer": {"num_query_token": 4}}, seed=3)
    (base, overrides, seed), = calls
    assert out is base and isinstance(base, EVAVisionTower) and len(base.blocks) == 2
    assert overrides == {"num_query_token": 4} and seed == 3
    build_eva("eva_vit_g_qformer", None, -2, TINY, 3)
    assert calls[-1][1] == {}


def test_output_dtype_follows_input():
    tower = tiny().eval()
    with torch.no_grad():
        assert tower(frames(2).double()).dtype == torch.float64
        out = tower.bfloat16()(frames(2).bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_checkpointing_gives_same_gradients():
    grads = []
    for checkpointing in (False, True):
        tower = perturbed(tiny()).train()
        tower.gradient_checkpointing = checkpointing
        tower.hidden(frames(2)).square().sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    for name, grad in grads[0].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[1][name], msg=name)


def test_qkv_module_is_called():
    """A LoRA adapter wraps ``qkv``: the forward must go through the module, not read its weight."""
    tower = perturbed(tiny()).eval()
    x = frames(2)
    with torch.no_grad():
        before = tower(x)
        handle = tower.blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: out + 1.0)
        after = tower(x)
        handle.remove()
    assert not torch.allclose(before, after)


def test_lora_with_peft():
    peft = pytest.importorskip("peft")
    tower = perturbed(tiny(layer=-2))
    lora = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                           target_modules=r".*\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)")
    model = peft.get_peft_model(tower, lora)
    model(frames(2)).square().sum().backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert len(trained) == 2 * 4 * 2  # A and B of qkv, proj, fc1, fc2 in the two kept blocks
