"""Training tokens per second of padding-free packing (``packing: true``) against padded batches, in one script.

The batches are a VideoInstruct-like mix: every sample has Video-ChatGPT's 356 video tokens (100 temporal + 256
spatial), a 24-token prompt and an answer of 20 to 400 text tokens (uniform), the same samples in the same batches
for both. A random Llama (``--hidden``, ``--layers``, GQA, a 4096-token vocabulary so that the LM head does not
dominate) with a linear connector trains the connector, the LLM frozen (Video-ChatGPT's stage, the backward pass
runs through every layer); a step is forward + backward on one batch of ``--batch`` samples
(:class:`~pipeline.data.dataset.VideoCollator` padded on the right, or packed into one row). Tokens per second
count the real tokens (video positions included, padding not); the figure is the median of ``--repeats`` passes
over the batches, padded and packed passes alternating (ABBA). ``--attn`` picks the attention kernel: ``sdpa``
(the CPU's: a packed batch gets a block-diagonal causal mask, dense, so its attention computes the whole row) or
``flash_attention_2`` (GPU with flash-attn: the varlen kernel, which computes only within each sample).

    python benchmarks/packing_throughput.py [--batch 4] [--batches 4] [--repeats 3] [--attn sdpa] [--device cpu]

Writes ``benchmarks/results/packing_throughput.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import IGNORE_INDEX, VIDEO_TOKEN_INDEX  # noqa: E402
from pipeline.data.dataset import VideoCollator  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.model.connectors import build_connector  # noqa: E402
from pipeline.model.video_llm import VideoLLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VIDEO_TOKENS, PROMPT, ANSWERS, DIM, VOCAB = 356, 24, (20, 400), 1024, 4096


def sample(generator: torch.Generator, answer: int) -> dict:
    """One sample: 4 prompt tokens, the video positions, 20 more prompt tokens, ``answer`` trained tokens; its
    ``(356, 1024)`` float32 video features in Video-ChatGPT's (100, 256) layout."""
    ids = torch.randint(1, VOCAB, (PROMPT + VIDEO_TOKENS + answer,), generator=generator)
    ids[4:4 + VIDEO_TOKENS] = VIDEO_TOKEN_INDEX
    labels = ids.clone()
    labels[:PROMPT + VIDEO_TOKENS] = IGNORE_INDEX
    return {"id": str(answer), "input_ids": ids, "labels": labels, "layouts": [(100, 256)],
            "video_features": torch.randn(VIDEO_TOKENS, DIM, generator=generator)}


def model(hidden: int, layers: int, attn: str, device: str) -> VideoLLM:
    """A random Llama of ``layers`` layers of width ``hidden`` (heads of 64, 2 KV heads, MLP 2.7x) in float32, its
    weights frozen, and a trained linear connector from the 1024-wide features."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                                       num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                       num_key_value_heads=2, max_position_embeddings=8192,
                                       attn_implementation=attn))
    llm.requires_grad_(False)
    return VideoLLM(llm, build_connector("linear", DIM, hidden)).to(device).train()


def step(net: VideoLLM, batch: dict, device: str) -> None:
    """Forward and backward on one collated batch."""
    net(**{key: value.to(device) for key, value in batch.items()}).loss.backward()
    net.zero_grad(set_to_none=True)


def passes(net: VideoLLM, batches: dict[str, list[dict]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of each pass over the batches, per layout, passes alternating (ABBA, so that a drifting machine
    load favours neither)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for name in batches:  # warm-up: one step of each layout
        step(net, batches[name][0], device)
    seconds = {name: [] for name in batches}
    for repeat in range(repeats):
        for name in list(batches)[::-1 if repeat % 2 else 1]:
            collated = batches[name]
            sync()
            start = time.perf_counter()
            for batch in collated:
                step(net, batch, device)
            sync()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="samples per batch")
    parser.add_argument("--batches", type=int, default=4, help="batches per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "packing_throughput.json"))
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    answers = torch.randint(ANSWERS[0], ANSWERS[1] + 1, (args.batches, args.batch), generator=generator).tolist()
    samples = [[sample(generator, answer) for answer in row] for row in answers]
    batches = {"padded": [VideoCollator(0)(row) for row in samples],
               "packed": [VideoCollator(0, packing=True)(row) for row in samples]}
    real = sum(int(batch["attention_mask"].sum()) for batch in batches["padded"])
    computed = sum(batch["input_ids"].numel() for batch in batches["padded"])
    net = model(args.hidden, args.layers, args.attn, args.device)
    seconds = passes(net, batches, args.repeats, args.device)
    results = {name: {"tokens_per_second": round(real / statistics.median(runs), 1),
                      "pass_seconds": [round(s, 3) for s in runs]} for name, runs in seconds.items()}
    ratio = results["packed"]["tokens_per_second"] / results["padded"]["tokens_per_second"]
    report = {
        "setup": {"device": args.device, "attn": args.attn, "torch": torch.__version__, "cpu": platform.processor(),
                  "threads": torch.get_num_threads(), "hidden": args.hidden, "layers": args.layers,
                  "batch": args.batch, "batches": args.batches, "repeats": args.repeats,
                  "video_tokens": VIDEO_TOKENS, "prompt_tokens": PROMPT, "answer_tokens": list(ANSWERS)},
        "real_tokens": real, "padded_tokens": computed, "padding_share": round(1 - real / computed, 3),
        **results, "packed_over_padded": round(ratio, 3),
    }
    write_json(args.out, report)
    print(f"{args.device} {args.attn}, batches of {args.batch}: {real} real tokens, {computed} padded "
          f"({report['padding_share']:.0%} padding)")
    for name in ("padded", "packed"):
        print(f"{name}: {results[name]['tokens_per_second']:.0f} tokens/s (passes {results[name]['pass_seconds']} s)")
    print(f"packed / padded: {ratio:.2f}x")


if __name__ == "__main__":
    main()
