"""Score a benchmark's prediction file with that benchmark's own rules and write the metrics as JSON.

    python -m pipeline.eval.score --benchmark etbench --annotations etbench_txt_v1.0.json \\
        --predictions PRED.json --out metrics.json [--subset subset.json]

``SCORERS`` maps a benchmark name to its scorer, a function ``(predictions, annotations=None, subset=None,
**options) -> dict`` that raises ``InputError`` (an exception with a one-line message naming the file) for an
input it cannot read; adding a benchmark is adding a module under ``pipeline/eval/benchmarks`` and a line here.
Exit status: 0 scored, 2 an input file unreadable or invalid (one line on stderr naming it), 1 the output could not
be written.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from pipeline.eval.benchmarks import etbench
from pipeline.io import write_json

SCORERS: dict[str, Callable[..., dict[str, Any]]] = {
    "etbench": etbench.score_files,
}

# The exceptions a scorer raises for a bad input file (exit status 2).
INPUT_ERRORS: tuple[type[Exception], ...] = (etbench.InputError,)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.eval.score", description=__doc__.split("\n")[0])
    parser.add_argument("--benchmark", required=True, choices=sorted(SCORERS), help="which benchmark's scorer")
    parser.add_argument("--predictions", required=True, help="the prediction file (or a folder of them)")
    parser.add_argument(
        "--annotations", help="the benchmark's annotation file (ground truth); default: the predictions' own fields"
    )
    parser.add_argument("--out", required=True, help="where to write the metrics JSON (atomically)")
    parser.add_argument("--subset", help="a subset id file ({task: {source: [idx, ...]}}) to score only those samples")
    sim = parser.add_argument_group("etbench sentence similarity (SentSim and the option fallback)")
    sim.add_argument(
        "--sentsim-model", default=etbench.SENTSIM_MODEL, help="model id or local folder (default: %(default)s)"
    )
    sim.add_argument("--allow-download", action="store_true", help="let sentence-transformers ask the Hugging Face hub")
    sim.add_argument("--no-sentsim", action="store_true", help="do not load a similarity model (its metrics: null)")
    sim.add_argument("--device", help="torch device for the similarity model")
    parser.add_argument("--seed", type=int, default=0, help="seed of dvc/slc's random reference strings")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 scored, 1 output not written, 2 bad input file).

    Args:
        argv: the arguments without the program name (default ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    options: dict[str, Any] = {}
    if args.benchmark == "etbench":
        options = {
            "similarity": None if args.no_sentsim else "auto",
            "similarity_model": args.sentsim_model,
            "allow_download": args.allow_download,
            "device": args.device,
            "seed": args.seed,
        }
    try:
        result = SCORERS[args.benchmark](args.predictions, annotations=args.annotations, subset=args.subset, **options)
    except INPUT_ERRORS as e:
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
    if "inputs" in result:
        parts.append(f"{result['inputs'].get('scored', 0)} records scored")
    if result.get("skipped"):
        parts.append(f"{len({(s['file'], s['index']) for s in result['skipped']})} malformed records skipped")
    invalid = sum(sum(c.values()) for c in result.get("invalid", {}).values())
    if invalid:
        parts.append(f"{invalid} invalid answers")
    if result.get("not_computed"):
        parts.append(f"not computed: {', '.join(result['not_computed'])}")
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
