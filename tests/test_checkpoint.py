"""What the pipeline writes follows the user's umask, and what a training process loads with torch.load is weights
and allow-listed types only."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from conftest import REPO

import pipeline.io
from pipeline.io import atomic_path, follow_umask, umask, write_text


@pytest.fixture
def mask():
    """Set the umask for a test, and put the old one back."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


def test_importing_io_leaves_the_umask_alone(monkeypatch):
    def changed(_):
        raise AssertionError("pipeline.io changed the process umask")

    monkeypatch.setattr(os, "umask", changed)
    importlib.reload(pipeline.io)


def test_files_get_the_umask_of_the_moment_they_are_written(tmp_path, mask):
    for value, expected in ((0o077, 0o600), (0o002, 0o664), (0o027, 0o640)):
        mask(value)
        assert umask() == value
        write_text(tmp_path / f"{value:o}.txt", "x")
        with atomic_path(tmp_path / f"{value:o}.safetensors") as tmp:  # safetensors replaces the file, mode 0o600
            safetensors.torch.save_file({"w": torch.zeros(2)}, tmp)
        for suffix in ("txt", "safetensors"):
            assert (tmp_path / f"{value:o}.{suffix}").stat().st_mode & 0o777 == expected, (value, suffix)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_follow_umask_gives_a_library_written_folder_the_usual_modes(tmp_path, mask):
    mask(0o002)
    folder = tmp_path / "model"
    (folder / "llm").mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.zeros(2)}, folder / "llm" / "model.safetensors")
    assert (folder / "llm" / "model.safetensors").stat().st_mode & 0o777 == 0o600
    os.chmod(folder / "llm", 0o700)
    follow_umask(folder)
    assert [p.stat().st_mode & 0o777 for p in (folder, folder / "llm", folder / "llm" / "model.safetensors")] == [
        0o775, 0o775, 0o664]


ALLOW_LIST = textwrap.dedent("""
    import sys
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from pipeline.train.weights_only import restrict_torch_load

    class Payload:
        def __reduce__(self):
            return open, (sys.argv[1] + "/executed", "w")

    held = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum(2),
            "address": fragment_address(numel=4, start=0), "weights": torch.ones(3), "shape": torch.Size([3])}
    torch.save(held, sys.argv[1] + "/optim_states.pt")
    torch.save(Payload(), sys.argv[1] + "/evil.pt")
    restrict_torch_load()
    loaded = torch.load(sys.argv[1] + "/optim_states.pt", weights_only=False)  # as DeepSpeed's engine loads
    assert loaded["loss_scaler"].cur_scale == 1.0 and loaded["zero_stage"] == 2 and loaded["address"].numel == 4
    try:
        torch.load(sys.argv[1] + "/evil.pt", weights_only=False)
    except Exception as error:
        print(type(error).__name__, str(error).splitlines()[0])
""")


def test_a_training_process_loads_deepspeeds_types_and_refuses_any_other_pickle(tmp_path):
    done = subprocess.run([sys.executable, "-c", ALLOW_LIST, str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1].startswith("UnpicklingError Weights only load failed"), done.stdout
    assert not (tmp_path / "executed").exists()
