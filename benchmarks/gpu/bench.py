"""One prepared GPU benchmark: feature extraction, training throughput and MFU, and training memory, in one run.

1. ``features``: frames/s of :func:`pipeline.features.extract.extract_shard` (open_clip ViT-L-14 geometry, random
   weights, ``pretrained: null``, float16, Video-ChatGPT's sampling of 100 frames a video and its pooling) against
   (a) the Video-ChatGPT loop of ``tests/videochatgpt_reference.py`` (an HF ``CLIPVisionModel`` of the same
   geometry in float16, its inputs moved to the GPU in float16 as the original script does) on the same clips, and
   (b) the bare tower on the same number of frames already in GPU memory, in batches of 32 (the ceiling).
2. ``training``: steps of the model :func:`pipeline.train.trainer.build_model` makes for a stage-2-like stage (the
   ``mm_projector`` plus LoRA r 64, alpha 128, on every linear layer of the LLM; and full fine-tuning) on a
   random-weight LLM of Qwen2.5-1.5B's geometry, batches of 4 sequences of 356 video tokens (Video-ChatGPT's
   100 + 256) plus 40 to 250 text tokens, bfloat16 autocast (trained weights float32, frozen ones bfloat16: the
   stage without DeepSpeed), AdamW: tokens/s (tokens that are not padding) and MFU, with SDPA and, where
   ``flash_attn`` imports, flash-attn 2; padded against packed batches where the stage config has ``packing``.
3. ``memory``: peak GPU memory (``torch.cuda.max_memory_allocated``: weights, optimizer state and activations) of
   the LoRA stage's step at 356 and at 4,096 video tokens, with and without activation checkpointing.

MFU = model FLOP/s / 989 TFLOP/s (H100/H200 SXM dense bfloat16), model FLOPs of a step = 6 * N * tokens
+ 12 * L * d * sum(s_i ** 2): N the parameters of the linear layers of the LLM (lm_head included, embedding
lookups not) and of the projector, L layers, d the hidden width, s_i each sequence's length without padding. The
6 N convention counts the weight gradients of frozen weights too, which a LoRA step does not compute (about 4 N).

``--tiny`` runs the same paths on the CPU in seconds: tiny tower and LLM, float32, 12-frame clips.

    python benchmarks/gpu/bench.py --out results/gpu_benchmark [--clips benchmarks/gpu/clips] [--tiny]

Writes ``<out>/gpu_benchmark.json`` and ``<out>/gpu_benchmark.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from videochatgpt_reference import load_tower, videochatgpt_features  # noqa: E402

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX  # noqa: E402
from pipeline.data.dataset import VideoCollator  # noqa: E402
from pipeline.features.encoder import FrameEncoder  # noqa: E402
from pipeline.features.extract import FeatureConfig, extract_shard  # noqa: E402
from pipeline.train.config import LoraSettings, StageConfig  # noqa: E402
from pipeline.train.trainer import build_model  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bfloat16, TFLOP/s
QWEN2_1_5B = {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
              "intermediate_size": 8960, "vocab_size": 151936, "max_position_embeddings": 32768,
              "tie_word_embeddings": True, "rope_theta": 1_000_000.0}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# CLIPVisionConfig fields of the reference's tower, at 224 px in 14 px patches (benchmarks/features.py's TOWERS,
# which this file does not import: that module needs PyAV and ffmpeg-python, which the GPU machine lacks)
VIT_L_14 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
TINY_CLIP = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What a run measures with.

    Attributes:
        videos: clips of the features benchmark.
        frames: frames sampled a video (Video-ChatGPT: 100).
        workers: DataLoader decoding processes of ours.
        tower: ``open_clip.create_model`` overrides of ViT-L-14 (``vision_cfg``, ``text_cfg``; {} for its own
            geometry); ``hf_tower`` the ``CLIPVisionConfig`` fields of the reference's tower.
        llm: ``Qwen2Config`` fields.
        feature_dim: width D of the cached video tokens.
        lora_rank: the LoRA rank r of the LLM's adapters (alpha = 2 r).
        video_tokens: video tokens a sequence in the throughput runs; ``memory_tokens`` those of the memory runs.
        text: (fewest, most) text tokens a sequence, drawn uniformly.
        batch: sequences a step.
        warmup, steps: untimed then timed steps of each training run.
        dtype: the precision of the features tower; training uses bfloat16 autocast when it is ``float16``.
    """

    videos: int
    frames: int
    workers: int
    tower: dict
    hf_tower: dict
    llm: dict
    feature_dim: int
    lora_rank: int
    video_tokens: int
    memory_tokens: tuple[int, ...]
    text: tuple[int, int]
    batch: int
    warmup: int
    steps: int
    dtype: str


GPU = Sizes(videos=64, frames=100, workers=4, tower={}, hf_tower=VIT_L_14, llm=QWEN2_1_5B,
            feature_dim=1024, lora_rank=64, video_tokens=356, memory_tokens=(356, 4096), text=(40, 250), batch=4,
            warmup=3, steps=10, dtype="float16")
TINY = Sizes(videos=2, frames=12, workers=0,
             tower={"vision_cfg": {"width": 32, "layers": 2, "head_width": 16},
                    "text_cfg": {"width": 32, "heads": 2, "layers": 1}},
             hf_tower=TINY_CLIP,
             llm={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "intermediate_size": 128, "vocab_size": 512, "tie_word_embeddings": True},
             feature_dim=32, lora_rank=4, video_tokens=36, memory_tokens=(36, 96), text=(4, 20), batch=2, warmup=1,
             steps=1, dtype="float32")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_tower(folder: Path, geometry: dict) -> Path:
    """A random-weight ``CLIPVisionModel`` of ``geometry`` at 224 px in 14 px patches, saved with CLIP's image
    processor to ``folder``."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=14, **geometry)).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    return folder


def make_clips(folder: Path, count: int, frames: int) -> list[Path]:
    """``count`` generated 176x144 H.264 clips of ``frames`` frames (for ``--tiny`` when no clips are given)."""
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(count):
        path = folder / f"clip_{i:02d}.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=176x144:rate=10",
                        "-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True)
        made.append(path)
    return made


def frame_count(video: Path) -> int:
    import decord

    return len(decord.VideoReader(str(video), num_threads=1))


def features(clips: list[Path], sizes: Sizes, work: Path) -> dict:
    """Frames/s of ours (the whole shard job, and without building the tower, ``tower_build_s`` seconds: the
    reference's tower is built before its timing), of the Video-ChatGPT loop and of the bare tower on frames in GPU
    memory (see the module's docstring); the first clip is run once by each before timing (CUDA set-up)."""
    config = FeatureConfig.from_dict({
        "backend": "open_clip", "model": "ViT-L-14", "pretrained": None,
        "overrides": sizes.tower, "resize": "stretch",
        "sampling": "videochatgpt", "num_frames": sizes.frames, "pooling": "videochatgpt",
        "temporal_tokens": sizes.frames, "batch_size": 32, "workers": sizes.workers, "precision": sizes.dtype,
    })
    frames = sum(min(sizes.frames, frame_count(clip)) for clip in clips)
    rows = [{"video_id": f"v{i:03d}", "path": str(clip)} for i, clip in enumerate(clips)]
    extract_shard(rows[:1], work / "warm.h5", config, threads=os.cpu_count())
    synchronize()
    start = time.perf_counter()
    status = extract_shard(rows, work / "ours.h5", config, threads=os.cpu_count())
    synchronize()
    ours = time.perf_counter() - start
    failed = [row["reason"] for row in status if row["status"] != "ok"]
    if failed:
        raise RuntimeError(f"features failed: {failed[:3]}")

    model_dir = hf_tower(work / "hf_tower", sizes.hf_tower)
    processor, hf = load_tower(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = hf.to(device, getattr(torch, sizes.dtype))
    weight = next(hf.parameters())
    # the original script's `video_tensor.half().cuda()` before the tower: the reference file runs on the CPU
    hf.register_forward_pre_hook(lambda module, args: (args[0].to(weight.device, weight.dtype),))
    videochatgpt_features(clips[0], model_dir, tower=(processor, hf))
    synchronize()
    start = time.perf_counter()
    for clip in clips:
        videochatgpt_features(clip, model_dir, tower=(processor, hf))
    synchronize()
    reference = time.perf_counter() - start

    start = time.perf_counter()
    encoder = FrameEncoder(config.encoder)  # what every extract_shard call pays first
    build = time.perf_counter() - start
    pixels = torch.randint(0, 256, (frames, 3, *encoder.prep.size), dtype=torch.uint8, device=encoder.device)
    with torch.inference_mode():
        encoder.tower(encoder.normalize(pixels[:32]))
        synchronize()
        start = time.perf_counter()
        for batch in pixels.split(32):
            encoder.tower(encoder.normalize(batch))
        synchronize()
    ceiling = time.perf_counter() - start
    return {"videos": len(clips), "frames": frames, "frames_per_video": sizes.frames,
            "encoder": {"backend": "open_clip", "model": "ViT-L-14", "pretrained": None, "overrides": sizes.tower,
                        "precision": sizes.dtype, "dim": encoder.dim, "grid": list(encoder.grid)},
            "decoding_workers": sizes.workers, "tower_build_s": build,
            "runs": {name: {"seconds": seconds, "frames_per_s": frames / seconds}
                     for name, seconds in (("ours", ours), ("ours_without_tower_build", ours - build),
                                           ("videochatgpt_loop", reference), ("encoder_ceiling", ceiling))}}


def save_llm(folder: Path, sizes: Sizes) -> Path:
    """A random-weight Qwen2 causal LM of ``sizes.llm`` saved to ``folder`` (built on the GPU where there is one),
    in the dtype the stage loads frozen weights in."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        llm = Qwen2ForCausalLM(Qwen2Config(**sizes.llm))
    llm.to(torch.bfloat16 if sizes.dtype == "float16" else torch.float32).save_pretrained(folder)
    del llm
    return folder


def stage(llm_training: str, sizes: Sizes, packing: bool, checkpointing: bool) -> StageConfig:
    """The stage-2-like stage: projector plus LoRA (``llm_training`` ``lora``) or full fine-tuning (``full``)."""
    extra = {"packing": True} if packing else {}
    lora = LoraSettings(r=sizes.lora_rank, alpha=2 * sizes.lora_rank, dropout=0.0, target_modules=LORA_TARGETS)
    return StageConfig(name="stage2", template="chatml", llm_training=llm_training,
                       lora=lora if llm_training == "lora" else None, bf16=sizes.dtype == "float16",
                       gradient_checkpointing=checkpointing, deepspeed=None, report_to=[], batch_size=sizes.batch,
                       **extra)


def packing_support() -> str | None:
    """None when packed batches can be made (``StageConfig`` has ``packing`` and ``VideoCollator`` takes it),
    else why not."""
    if "packing" not in {f.name for f in dataclasses.fields(StageConfig)}:
        return "not available: pipeline.train.config.StageConfig has no packing field"
    if "packing" not in inspect.signature(VideoCollator).parameters:
        return "not available: StageConfig has packing but VideoCollator takes no packing argument"
    return None


def items(sizes: Sizes, video_tokens: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` dataset items as :class:`pipeline.data.dataset.InstructionDataset` gives them: a prompt of 8 to 20
    text tokens, the video's positions, then an answer that makes up the rest of the text (the loss's labels), and
    the video's ``(video_tokens, D)`` features."""
    rng = np.random.default_rng(seed)
    out = []
    vocab = sizes.llm["vocab_size"]
    for i in range(count):
        text = int(rng.integers(sizes.text[0], sizes.text[1] + 1))
        prompt = min(text - 1, int(rng.integers(8, 21)))
        ids = torch.cat([torch.from_numpy(rng.integers(0, vocab, prompt)),
                         torch.full((video_tokens,), VIDEO_TOKEN_INDEX),
                         torch.from_numpy(rng.integers(0, vocab, text - prompt))]).long()
        labels = ids.clone()
        labels[:prompt + video_tokens] = IGNORE_INDEX
        layout = (100, 256) if video_tokens == 356 else (video_tokens, 1)
        out.append({"id": f"r{i}", "input_ids": ids, "labels": labels, "layouts": [layout],
                    "video_features": torch.from_numpy(rng.standard_normal((video_tokens, sizes.feature_dim))
                                                       .astype(np.float32))})
    return out


def batch_of(collator: VideoCollator, samples: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """The collated batch on ``device``, its video features in ``dtype`` (as the stage's data loader gives them)."""
    batch = collator(samples)
    batch["video_features"] = batch["video_features"].to(dtype)
    return {key: value.to(device) for key, value in batch.items()}


def linear_parameters(model: torch.nn.Module) -> int:
    """Parameters of the model's linear layers (LoRA's own excluded: they are counted in ``trainable``)."""
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lora_" not in name)


def train_run(llm: Path, sizes: Sizes, llm_training: str, attention: str, packing: bool, checkpointing: bool,
              video_tokens: int) -> dict:
    """One training run: ``sizes.warmup`` untimed then ``sizes.steps`` timed steps of forward, backward and AdamW.

    Returns:
        tokens_per_s (tokens that are not padding), step_s (seconds a step), mfu (fraction of PEAK_TFLOPS),
        model_tflops_per_step, peak_memory_gib (None on the CPU), trainable and linear parameter counts.
    """
    config = stage(llm_training, sizes, packing, checkpointing)
    model, _ = build_model(config, str(llm), sizes.feature_dim)
    base = model.llm.get_base_model() if hasattr(model.llm, "get_base_model") else model.llm
    if base.config._attn_implementation != attention:  # load_llm takes flash-attn when it imports
        base.set_attn_implementation(attention)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    collator = VideoCollator(0, **({"packing": True} if packing else {}))
    steps = sizes.warmup + sizes.steps
    pool = items(sizes, video_tokens, sizes.batch * steps)
    batches = [pool[i * sizes.batch:(i + 1) * sizes.batch] for i in range(steps)]
    features_dtype = torch.bfloat16 if config.bf16 else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elapsed = 0.0
    for step, samples in enumerate(batches):
        batch = batch_of(collator, samples, device, features_dtype)
        synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        if step >= sizes.warmup:
            elapsed += time.perf_counter() - start
    timed = batches[sizes.warmup:]
    tokens = sum(len(s["input_ids"]) for samples in timed for s in samples)
    squares = sum(len(s["input_ids"]) ** 2 for samples in timed for s in samples)
    linear = linear_parameters(model)
    layers, hidden = sizes.llm["num_hidden_layers"], sizes.llm["hidden_size"]
    flops = 6 * linear * tokens + 12 * layers * hidden * squares
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {"tokens_per_s": tokens / elapsed, "step_s": elapsed / sizes.steps,
              "mfu": flops / elapsed / (PEAK_TFLOPS * 1e12), "model_tflops_per_step": flops / sizes.steps / 1e12,
              "peak_memory_gib": peak, "trainable_parameters": sum(p.numel() for p in trainable),
              "linear_parameters": linear, "loss": float(loss)}
    del model, optimizer, trainable, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def attempt(run, *args) -> dict:
    """``run(*args)``, or ``{"error": ...}`` when it fails (out of memory, a missing method in this transformers),
    so that one failing configuration leaves the rest of the benchmark standing."""
    try:
        return run(*args)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def training(llm: Path, sizes: Sizes) -> dict:
    """Every throughput run: LoRA and full fine-tuning, each attention implementation, padded and packed."""
    attentions = ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") and
                             torch.cuda.is_available() else [])
    unpackable = packing_support()
    runs = []
    for llm_training in ("lora", "full"):
        for attention in attentions:
            for packing in (False,) if unpackable else (False, True):
                runs.append({"llm_training": llm_training, "attention": attention,
                             "batches": "packed" if packing else "padded",
                             **attempt(train_run, llm, sizes, llm_training, attention, packing, False,
                                       sizes.video_tokens)})
    return {"llm": sizes.llm, "video_tokens": sizes.video_tokens, "text_tokens": list(sizes.text),
            "batch": sizes.batch, "timed_steps": sizes.steps,
            "lora": {"r": sizes.lora_rank, "alpha": 2 * sizes.lora_rank, "target_modules": LORA_TARGETS},
            "precision": "bfloat16 autocast" if sizes.dtype == "float16" else "float32",
            "flash_attn": "importable" if "flash_attention_2" in attentions else "not importable",
            "packing": unpackable or "available", "peak_tflops": PEAK_TFLOPS,
            "flops_formula": "6 * N * tokens + 12 * L * d * sum(s_i^2) per step; N = linear-layer parameters of "
                             "LLM (lm_head included) and projector",
            "runs": runs}


def memory(llm: Path, sizes: Sizes) -> dict:
    """Peak GPU memory of the LoRA stage's step (SDPA, padded) at each of ``sizes.memory_tokens`` video tokens,
    with and without activation checkpointing."""
    runs = []
    for video_tokens in sizes.memory_tokens:
        for checkpointing in (False, True):
            found = attempt(train_run, llm, sizes, "lora", "sdpa", False, checkpointing, video_tokens)
            runs.append({"video_tokens": video_tokens, "activation_checkpointing": checkpointing,
                         **{key: found[key] for key in ("peak_memory_gib", "step_s", "error") if key in found}})
    return {"llm_training": "lora", "batch": sizes.batch, "runs": runs}


def environment() -> dict:
    """The device, torch, CUDA and the libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'}), "
                                                                 f"{os.cpu_count()} cores",
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": platform.python_version(),
            **{name: installed(name) for name in ("transformers", "peft", "open_clip_torch", "decord", "deepspeed",
                                                  "flash-attn")}}


def markdown(result: dict) -> str:
    """The results as Markdown tables."""
    env, feats, train, mem = (result[key] for key in ("environment", "features", "training", "memory"))
    lines = [f"Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, transformers "
             f"{env['transformers']}, peft {env['peft']}, open_clip {env['open_clip_torch']}, decord {env['decord']}, "
             f"flash-attn {env['flash-attn']}; {result['mode']} run, {result['seconds']:.0f} s.", "",
             "## Features", ""]
    if "error" in feats:
        lines.append(f"error: {feats['error']}")
    else:
        lines += [f"{feats['videos']} videos, {feats['frames']} frames ({feats['frames_per_video']} a video at most), "
                  f"open_clip ViT-L-14 geometry {feats['encoder']['overrides'] or ''} random weights, "
                  f"{feats['encoder']['precision']}, ours with {feats['decoding_workers']} decoding workers", "",
                  "| run | seconds | frames/s | of ceiling |", "|---|---|---|---|"]
        ceiling = feats["runs"]["encoder_ceiling"]["frames_per_s"]
        for name, run in feats["runs"].items():
            lines.append(f"| {name} | {run['seconds']:.2f} | {run['frames_per_s']:.1f} | "
                         f"{run['frames_per_s'] / ceiling:.2f} |")
    lines += ["", "## Training", "", f"{train['llm']['hidden_size']} hidden, {train['llm']['num_hidden_layers']} "
              f"layers, vocabulary {train['llm']['vocab_size']}; batches of {train['batch']} sequences of "
              f"{train['video_tokens']} video tokens + {train['text_tokens'][0]} to {train['text_tokens'][1]} text "
              f"tokens; {train['precision']}; flash-attn {train['flash_attn']}; packing {train['packing']}. "
              f"MFU: {train['flops_formula']}, peak {train['peak_tflops']:.0f} TFLOP/s.", "",
              "| LLM | attention | batches | tokens/s | step s | MFU | peak GiB | trainable |",
              "|---|---|---|---|---|---|---|---|"]
    for run in train["runs"]:
        if "error" in run:
            lines.append(f"| {run['llm_training']} | {run['attention']} | {run['batches']} | error: {run['error']} "
                         "| | | | |")
            continue
        peak = f"{run['peak_memory_gib']:.1f}" if run["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {run['llm_training']} | {run['attention']} | {run['batches']} | {run['tokens_per_s']:,.0f} "
                     f"| {run['step_s']:.3f} | {run['mfu']:.1%} | {peak} | {run['trainable_parameters'] / 1e6:.1f} M |")
    lines += ["", "## Memory of the LoRA step", "", f"batch {mem['batch']}", "",
              "| video tokens | activation checkpointing | peak GiB | step s |", "|---|---|---|---|"]
    for run in mem["runs"]:
        if "error" in run:
            lines.append(f"| {run['video_tokens']} | {run['activation_checkpointing']} | error: {run['error']} | |")
            continue
        peak = f"{run['peak_memory_gib']:.1f}" if run["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {run['video_tokens']} | {run['activation_checkpointing']} | {peak} | {run['step_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder of gpu_benchmark.json and gpu_benchmark.md")
    parser.add_argument("--clips", help="folder of mp4 clips (benchmarks/gpu/prepare.sh makes them); --tiny "
                                        "generates its own when not given")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU, for the test")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else GPU
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU: run with --tiny")
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"mode": "tiny" if args.tiny else "gpu", "environment": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.clips:
            found = sorted(Path(args.clips).glob("*.mp4"))
            clips = [found[i % len(found)] for i in range(sizes.videos)]
        else:
            clips = make_clips(work / "clips", sizes.videos, sizes.frames)
        result["features"] = attempt(features, clips, sizes, work)
        result["section_seconds"] = {"features": time.perf_counter() - start}
        llm = save_llm(work / "llm", sizes)
        result["training"] = training(llm, sizes)
        result["section_seconds"]["training"] = time.perf_counter() - start - sum(result["section_seconds"].values())
        result["memory"] = memory(llm, sizes)
        result["section_seconds"]["memory"] = time.perf_counter() - start - sum(result["section_seconds"].values())
    result["seconds"] = time.perf_counter() - start
    (out / "gpu_benchmark.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_benchmark.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
