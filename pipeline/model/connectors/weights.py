"""Reading the ``mm_projector`` weights of LLaVA-family checkpoints (the connector a first stage starts from)."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "mm_projector.safetensors", "mm_projector.bin")


def projector_weights(source: str) -> dict:
    """The ``mm_projector`` weights of a LLaVA-family checkpoint, named as
    :func:`pipeline.model.connectors.build_connector` names them.

    Video-ChatGPT starts from LLaVA-Lightning-7B, whose checkpoint carries LLaVA's image ``mm_projector``
    (``model.mm_projector.weight``/``bias``); its video projector starts from those weights (Video-ChatGPT
    ``video_chatgpt/model/video_chatgpt.py``: the projector is part of the loaded model). LLaVA's pretraining
    stage writes ``mm_projector.bin`` files of the same names.

    Args:
        source: a checkpoint folder or hub name (read through its weight index when sharded), or one weight file.
            ``.safetensors`` are read as such; ``.bin`` files with ``torch.load(weights_only=True)``, which loads
            tensors only and never runs pickled code.

    Raises:
        ValueError: no ``mm_projector`` weights in ``source``.
    """
    import safetensors.torch
    import torch
    from transformers.utils import cached_file

    files = [Path(source)] if Path(source).is_file() else []
    if not files:
        for name in WEIGHT_INDEXES:
            index = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
            if index:
                weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted({shard for key, shard in weight_map.items() if "mm_projector." in key})
                files = [Path(cached_file(source, shard)) for shard in shards]
                break
        else:
            files = [Path(found) for name in WEIGHT_FILES
                     if (found := cached_file(source, name, _raise_exceptions_for_missing_entries=False))][:1]
    found = {}
    for path in files:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        found.update({key.split("mm_projector.", 1)[1]: value.float() for key, value in state.items()
                      if "mm_projector." in key})
    if not found:
        raise ValueError(f"{source}: no mm_projector weights (looked for keys containing 'mm_projector.' in "
                         f"{[str(p) for p in files] or 'no weight file'})")
    return found
