"""Every ``torch.load`` of a training process loads tensors and allow-listed types only, never arbitrary pickle.

Resuming a stage reads pickle files that the HF Trainer and DeepSpeed wrote into its checkpoint:

- the Trainer's ``rng_state*.pth``, ``optimizer.pt`` and ``scheduler.pt``, which it loads with ``weights_only=True``
  itself (with numpy's ``_reconstruct``, ``ndarray`` and ``dtype`` allowed around the rng file);
- DeepSpeed 0.19.8's ``global_step*/*model_states.pt`` and ``*optim_states.pt`` (ZeRO-2 and ZeRO-3, float32 and
  bfloat16), which its ``TorchCheckpointEngine`` loads with ``weights_only=False``. Besides tensors, ``torch.Size``
  and plain containers they hold a ``LossScaler``, a ``ZeroStageEnum`` and (ZeRO-2) ``fragment_address`` records:
  :data:`DEEPSPEED_GLOBALS`.

:func:`restrict_torch_load` sets ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which torch honours over a caller's
``weights_only=False``, and allow-lists those three DeepSpeed types, so that a resume works and a checkpoint file
holding any other object (a malicious pickle) is refused with ``pickle.UnpicklingError`` ("Weights only load
failed ... Unsupported global") instead of being executed.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _deepspeed_types() -> list[type]:
    """The classes of :data:`DEEPSPEED_GLOBALS` (none when DeepSpeed is not installed: nothing writes them)."""
    if importlib.util.find_spec("deepspeed") is None:
        return []
    types = []
    for name in DEEPSPEED_GLOBALS:
        module, attribute = name.rsplit(".", 1)
        types.append(getattr(importlib.import_module(module), attribute))
    return types


def restrict_torch_load() -> None:
    """Force ``weights_only=True`` on every later ``torch.load`` of this process and of the processes it starts,
    with :data:`DEEPSPEED_GLOBALS` allowed."""
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(_deepspeed_types())
