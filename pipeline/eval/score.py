"""Score a benchmark's predictions with that benchmark's own rules and write the metrics as JSON: for predictions
made anywhere (an lmms-eval run, another system's outputs, ``pipeline.eval.run``).

    python -m pipeline.eval.score --benchmark videomme --annotations videomme.parquet \\
        --predictions PRED.jsonl --out metrics.json [--variant lmms_eval]
    python -m pipeline.eval.score --benchmark activitynet_qa --annotations test_q.json --predictions PRED.jsonl \\
        --judge '{"kind": "openai", "base_url": "http://vllm:8000/v1", "model": "Qwen2.5-72B-Instruct"}' \\
        --judge-cache judgments.jsonl --out metrics.json
    python -m pipeline.eval.score --benchmark etbench --annotations etbench_txt_v1.0.json \\
        --predictions PRED.json --out metrics.json [--subset subset.json]

``--benchmark`` is a name of :data:`pipeline.eval.benchmarks.REGISTRY` (``--annotations`` in that benchmark's
published layout, ``--predictions`` JSON lines ``{"id", "prediction"}`` or the submission file its lmms-eval task
writes) or ``etbench`` (E.T. Bench's own prediction layout). Exit status: 0 scored, 2 an input file unreadable or
invalid or a bad option (one line on stderr naming it), 1 the output could not be written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline.eval.benchmarks import JUDGED, etbench, get, headline
from pipeline.eval.benchmarks import REGISTRY as BENCHMARKS
from pipeline.eval.benchmarks.base import Benchmark
from pipeline.io import read_yaml, write_json


def score_benchmark(benchmark: Benchmark, items: list[dict], predictions: dict[str, Any], variant: str | None = None,
                    judge: dict | None = None, judge_cache: str | Path | None = None) -> dict[str, Any]:
    """``benchmark``'s metrics of ``predictions`` on ``items``, with the benchmark's name and format and the
    ``headline`` numbers (:func:`pipeline.eval.benchmarks.headline`) added.

    Args:
        variant: the scorer variant of an ``mcq`` / ``grounding`` benchmark (``videochat_flash``, the default, or
            ``lmms_eval``); refused for the other formats.
        judge: the judge config of a judged format (:func:`pipeline.eval.judge.judge_from_config`).
        judge_cache: the judgments' JSON-lines cache (reruns re-query nothing; a changed judge is a new key).

    Raises:
        ValueError: a variant the benchmark has not, a judged format without a judge, or a bad judge config.
    """
    options: dict[str, Any] = {}
    if variant is not None:
        if "videochat_flash" not in benchmark.options:
            raise ValueError(f"{benchmark.name}: has no scorer variants (given {variant!r})")
        options["variant"] = variant
    if benchmark.format in JUDGED:
        if judge is None:
            raise ValueError(f"{benchmark.name}: is scored by a judge model; give one (judge config)")
        options.update(judge=judge, cache=judge_cache)
    metrics = benchmark.score(items, predictions, **options)
    return {"benchmark": benchmark.name, "format": benchmark.format, **metrics, "headline": headline(metrics)}


def _judge_config(text: str | None) -> dict | None:
    """A judge config given inline as JSON or as the path of a JSON / YAML file."""
    if text is None:
        return None
    if Path(text).is_file():
        config = read_yaml(text)  # YAML reads JSON too
    else:
        try:
            config = json.loads(text)
        except ValueError as e:
            raise ValueError(f"--judge: neither a file nor JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError("--judge: expected an object {\"kind\": \"hf\" | \"openai\", ...}")
    return config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.score", description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", required=True, choices=sorted([*BENCHMARKS, "etbench"]),
                        help="which benchmark's scorer")
    parser.add_argument("--predictions", required=True, help="the prediction file (etbench: or a folder of them)")
    parser.add_argument("--annotations", help="the benchmark's annotations in its published layout (etbench "
                                              "default: the predictions' own fields)")
    parser.add_argument("--out", required=True, help="where to write the metrics JSON (atomically)")
    parser.add_argument("--variant", choices=("videochat_flash", "lmms_eval"),
                        help="mcq / grounding: whose scorer (default videochat_flash: VideoChat-Flash's lmms-eval "
                             "fork, quirks included; lmms_eval: the current lmms-eval release)")
    parser.add_argument("--judge", help="open_qa / vcgpt_*: the judge config, JSON inline or a JSON/YAML file "
                                        "({\"kind\": \"hf\", \"model\": PATH} or {\"kind\": \"openai\", "
                                        "\"base_url\": URL, \"model\": NAME, \"api_key_env\": VAR})")
    parser.add_argument("--judge-cache", help="JSON-lines cache of the judgments (default: none kept)")
    parser.add_argument("--subset", help="etbench: a subset id file ({task: {source: [idx, ...]}})")
    sim = parser.add_argument_group("etbench sentence similarity (SentSim and the option fallback)")
    sim.add_argument(
        "--sentsim-model", default=etbench.SENTSIM_MODEL, help="model id or local folder (default: %(default)s)"
    )
    sim.add_argument("--allow-download", action="store_true", help="let sentence-transformers ask the Hugging Face hub")
    sim.add_argument("--no-sentsim", action="store_true", help="do not load a similarity model (its metrics: null)")
    sim.add_argument("--device", help="torch device for the similarity model")
    parser.add_argument("--seed", type=int, default=0, help="etbench: seed of dvc/slc's random reference strings")
    return parser


def _score(args: argparse.Namespace) -> dict[str, Any]:
    if args.benchmark == "etbench":
        return etbench.score_files(args.predictions, annotations=args.annotations, subset=args.subset,
                                   similarity=None if args.no_sentsim else "auto",
                                   similarity_model=args.sentsim_model, allow_download=args.allow_download,
                                   device=args.device, seed=args.seed)
    if args.annotations is None:
        raise ValueError(f"--annotations: required for {args.benchmark}")
    benchmark = get(args.benchmark)
    items, skipped = benchmark.load(args.annotations)
    predictions = benchmark.read_predictions(args.predictions)
    result = score_benchmark(benchmark, items, predictions, args.variant, _judge_config(args.judge),
                             args.judge_cache)
    return {**result, "skipped": skipped, "inputs": {"annotations": args.annotations,
                                                      "predictions": args.predictions, "scored": len(items)}}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 scored, 1 output not written, 2 bad input or option).

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    try:
        result = _score(args)
    except ValueError as e:  # InputError (a bad input file) is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        write_json(args.out, result)
    except OSError as e:
        print(f"error: {args.out}: cannot write: {e}", file=sys.stderr)
        return 1
    print(_summary(args.out, result))
    return 0


def _summary(out: str, result: dict[str, Any]) -> str:
    """One line for the terminal: where the metrics went and how much was scored, skipped or left uncomputed."""
    parts = [f"wrote {out}"]
    if "headline" in result and result["headline"]["overall"] is not None:
        parts.append(f"{result['benchmark']} {result['headline']['overall']:.4g} ({result['headline']['units']})")
    if "inputs" in result:
        parts.append(f"{result['inputs'].get('scored', 0)} records scored")
    if result.get("skipped"):
        parts.append(f"{len({(s['file'], s.get('record', s.get('index'))) for s in result['skipped']})} "
                     "malformed records skipped")
    if result.get("unanswered"):
        parts.append(f"{result['unanswered']} unanswered")
    invalid = result.get("invalid", 0)
    if isinstance(invalid, dict):  # etbench: {task: {reason: n}}
        invalid = sum(sum(c.values()) for c in invalid.values())
    if invalid:
        parts.append(f"{invalid} invalid answers")
    if result.get("not_computed"):
        parts.append(f"not computed: {', '.join(result['not_computed'])}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
