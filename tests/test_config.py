"""One source of truth: the config schema's enums and defaults are the code's, and every command line is fast to
ask for help, names itself as it is run, and defaults to what the schema says."""

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
from conftest import REPO

from pipeline.io import read_yaml

SCHEMA = read_yaml(REPO / "workflow" / "schemas" / "config.schema.yaml")
PROPS = SCHEMA["properties"]
STAGE = PROPS["stages"]["items"]["properties"]
DATA = PROPS["data"]["properties"]


def _defaults(properties: dict) -> dict:
    return {key: spec["default"] for key, spec in properties.items() if "default" in spec}


def test_the_schemas_enums_are_the_codes():
    from pipeline.data.formats import FORMATS, Options
    from pipeline.data.templates import TEMPLATES
    from pipeline.features.encoder import BACKENDS, PRECISIONS, RESIZES
    from pipeline.features.pooling import POOLINGS
    from pipeline.model.connectors import CONNECTORS as PROJECTORS
    from pipeline.train.config import (
        AUGMENTATIONS,
        CONNECTOR_TRAINING,
        LLM_TRAINING,
        PARAM_GROUPS,
        SCHEDULERS,
        TOWER_TRAINING,
        VISION,
    )
    from pipeline.video import augment
    from pipeline.video.frames import SAMPLINGS

    features = PROPS["features"]["properties"]
    assert SCHEMA["$defs"]["template"]["enum"] == list(TEMPLATES)
    assert PROPS["llm"]["properties"]["template"]["$ref"] == "#/$defs/template"
    assert {"$ref": "#/$defs/template"} in STAGE["template"]["anyOf"]
    for key, code in (("backend", BACKENDS), ("resize", RESIZES), ("precision", PRECISIONS), ("sampling", SAMPLINGS),
                      ("pooling", POOLINGS)):
        assert features[key]["enum"] == list(code), key
    assert PROPS["model"]["properties"]["mm_projector_type"]["enum"] == list(PROJECTORS)
    assert STAGE["train"]["properties"]["llm"]["enum"] == list(LLM_TRAINING)
    assert STAGE["train"]["properties"]["vision_tower"]["enum"] == list(TOWER_TRAINING)
    assert STAGE["train"]["properties"]["connector"]["oneOf"][0]["enum"] == list(CONNECTOR_TRAINING)
    assert STAGE["vision"]["enum"] == list(VISION)
    assert STAGE["augment"]["enum"] == list(AUGMENTATIONS) == list(augment.AUGMENTATIONS)
    assert list(STAGE["param_groups"]["properties"]) == list(PARAM_GROUPS)
    assert STAGE["frames"]["properties"]["sampling"]["enum"] == list(SAMPLINGS)
    assert STAGE["lr_scheduler"]["enum"] == list(SCHEDULERS)
    dataset = PROPS["instructions"]["properties"]["datasets"]["items"]["properties"]
    assert dataset["format"]["enum"] == list(FORMATS)
    options = {f.name: f.default for f in dataclasses.fields(Options)}
    for key in ("root", "labels", "images", "split", "video_placement", "timestamps"):
        assert dataset[key]["default"] == options[key], key


def test_the_schemas_defaults_are_the_codes():
    from pipeline.data.mixing import MixEntry
    from pipeline.features.extract import FeatureConfig
    from pipeline.train.config import STAGE_HYPERPARAMETERS, LoraSettings, StageConfig

    features = _defaults(PROPS["features"]["properties"])
    code = FeatureConfig()
    own = {f.name: getattr(code, f.name) for f in dataclasses.fields(code) if f.name not in ("encoder", "sampling")}
    flat = {**dataclasses.asdict(code.encoder), **dataclasses.asdict(code.sampling), **own}
    flat["sampling"] = flat.pop("method")
    assert {key: value for key, value in features.items() if key != "resources"} == flat

    stage_fields = {f.name: f for f in dataclasses.fields(StageConfig)}
    stage_defaults = _defaults(STAGE)
    assert set(STAGE_HYPERPARAMETERS) <= set(stage_defaults)  # every setting a stage passes on has one default
    for key in STAGE_HYPERPARAMETERS:
        field = stage_fields[key]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        assert stage_defaults[key] == default, key
    assert _defaults(STAGE["lora"]["properties"]) == dataclasses.asdict(LoraSettings())
    mix = _defaults(STAGE["data"]["items"]["properties"])
    assert mix == {"ratio": MixEntry("d").ratio, "max_records": MixEntry("d").max_records}


# module -> (subcommand or None, {option dest: schema default})
COMMANDS = {
    "pipeline.shards": (None, {}),
    "pipeline.manifest": ("folder", {}),
    "pipeline.download": (None, {"timeout": PROPS["download"]["properties"]["timeout"]["default"],
                                 "retries": PROPS["download"]["properties"]["retries"]["default"]}),
    "pipeline.video.transcode": (None, {"crf": PROPS["transcode"]["properties"]["crf"]["default"],
                                        "preset": PROPS["transcode"]["properties"]["preset"]["default"],
                                        "timeout": DATA["video_timeout"]["default"],
                                        "max_decode_errors": DATA["max_decode_errors"]["default"]}),
    "pipeline.video.index": (None, {}),
    "pipeline.video.compress": (None, {key: PROPS["compress"]["properties"][key]["default"]
                                       for key in ("fps", "size", "crf", "preset")}),
    "pipeline.features.extract": ("shard", {}),
    "pipeline.features.import_pickle": (None, {}),
    "pipeline.data.instructions": (None, {key: PROPS["instructions"]["properties"][key]["default"]
                                          for key in ("val_fraction", "seed")}),
    "pipeline.data.mixing": (None, {}),
    "pipeline.model.convert_gguf": (None, {}),
    "pipeline.train.launch": (None, {}),
    "pipeline.train.stage": (None, {}),
    "pipeline.eval.generate": (None, {"max_new_tokens": PROPS["evaluate"]["properties"]["max_new_tokens"]["default"],
                                      "batch_size": PROPS["evaluate"]["properties"]["batch_size"]["default"]}),
    "pipeline.report": ("summary", {}),
}
HEAVY = ("torch", "transformers", "deepspeed", "open_clip", "peft", "accelerate", "decord", "matplotlib")


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_every_command_line_helps_fast_names_itself_and_defaults_to_the_schema(module):
    subcommand, defaults = COMMANDS[module]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run([sys.executable, "-m", module, *([subcommand] if subcommand else []), "--help"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time")}
    assert not {name for name in imported if name.split(".")[0] in HEAVY}, "--help imports heavy packages"
    assert done.stdout.startswith(f"usage: python -m {module}"), done.stdout[:200]
    assert "``" not in done.stdout and ":func:" not in done.stdout
    parser = importlib.import_module(module).parser()
    assert parser.description.endswith(".")  # the whole first paragraph, not its first line
    assert subcommand or " ".join(parser.description.split()) in " ".join(done.stdout.split())
    if subcommand:
        parser = parser._subparsers._group_actions[0].choices[subcommand]
    for dest, value in defaults.items():
        assert parser.get_default(dest) == value, (module, dest)
