"""The workflow config, checked before any job: one line per problem, naming the key, the file and what to do.

Snakemake's own ``validate`` prints the whole schema after a bad key; :func:`check_config` says instead
``config error: stages[0].learnig_rate (config/recipes/etchat.yaml): unknown key; did you mean 'learning_rate'?``.
It also refuses numbers that JSON schema lets through but no stage can use (``.nan``, ``.inf``), and
:func:`missing_inputs` lists every input file the config names that does not exist, so that a missing annotation
file stops ``snakemake -n`` instead of failing after the videos are processed.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path

from pipeline import PipelineError
from pipeline.io import read_yaml


class ConfigError(PipelineError):
    """A config that cannot run; the message is one line per problem."""


def _where(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "config"


def _lookup(data, path) -> bool:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return False
    return True


def _source(path, files: list[str]) -> str:
    """The config file a key comes from: the first of ``files`` (highest precedence first) holding it."""
    for file in files:
        try:
            if _lookup(read_yaml(file) or {}, path):
                relative = os.path.relpath(file)
                return str(file) if relative.startswith("..") else relative
        except OSError:
            continue
    return "--config" if files else "the config"


def _schema_at(schema: dict, root: dict, path) -> dict:
    """The sub-schema that describes the value at ``path`` (following ``$ref``, ``items``, ``anyOf``)."""
    node = schema
    for part in path:
        while "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    while "$ref" in node:
        node = root["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _message(error, schema: dict) -> str:
    path = list(error.absolute_path)
    if error.validator == "additionalProperties":
        known = sorted(_schema_at(schema, schema, path).get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        key = extra[0]
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
        return _where(path + [key]), f"unknown key; {hint}", path + [key]
    if error.validator == "enum":
        close = difflib.get_close_matches(str(error.instance), [str(v) for v in error.validator_value], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(str(v) for v in error.validator_value)
        return _where(path), f"{error.instance!r} is not one of {choices}{hint}", path
    return _where(path), error.message, path


def _non_finite(value, path=()):
    if isinstance(value, float) and not math.isfinite(value):
        yield list(path), value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from _non_finite(inner, (*path, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            yield from _non_finite(inner, (*path, i))


def check_config(config: dict, schema_path: str | Path, files: list[str]) -> None:
    """Validate ``config`` against the schema at ``schema_path`` and refuse non-finite numbers.

    Args:
        files: the config files in use, highest precedence first (Snakemake's ``workflow.configfiles``), to name
            the file a bad key comes from.

    Raises:
        ConfigError: one line per problem: the key's path, its file, what is wrong and the closest valid key or
            value.
    """
    from jsonschema import Draft202012Validator

    schema = read_yaml(schema_path)
    problems = []
    for error in sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path)):
        where, what, path = _message(error, schema)
        problems.append(f"config error: {where} ({_source(path, files)}): {what}")
    for path, value in _non_finite(config):
        problems.append(f"config error: {_where(path)} ({_source(path, files)}): {value} is not a finite number")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _local(value: str | None) -> bool:
    """Whether a name that may be a hub id or a path is meant as a local path (absolute, ``./``, ``../``, ``~``, or
    a weight file's extension)."""
    return bool(value) and (value.startswith(("/", "./", "../", "~")) or
                            Path(value).suffix in (".bin", ".safetensors", ".pt", ".pth", ".gguf"))


def missing_inputs(config: dict, made: set[str], files: list[str] = ()) -> list[str]:
    """The input files and folders ``config`` names that do not exist (and no rule makes), one line each with the
    key.

    Checked: ``data.manifest``, each dataset's ``annotations``, ``labels`` and ``root``, each benchmark's
    ``annotations`` and ``root``, ``llm.name_or_path``,
    ``model.mm_projector_init`` and ``features.pretrained`` when they are clearly local paths (absolute, ``./``,
    ``../``, ``~`` or a weight file: a bare ``org/name`` may be a hub id, which cannot be checked offline), and the
    ``download.allowed_roots`` folders.

    Args:
        made: paths that rules of the workflow write (the demo's manifest, a converted LLM).
        files: the config files, highest precedence first, to name the file of each key.
    """
    named = [(["data", "manifest"], config["data"]["manifest"])]
    for i, dataset in enumerate(config["instructions"]["datasets"]):
        named += [(["instructions", "datasets", i, key], dataset.get(key)) for key in ("annotations", "labels", "root")]
    for i, benchmark in enumerate(config["evaluate"]["benchmarks"]):
        named += [(["evaluate", "benchmarks", i, key], benchmark.get(key)) for key in ("annotations", "root")]
    maybe_local = ((["llm", "name_or_path"], config["llm"]["name_or_path"]),
                   (["model", "mm_projector_init"], config["model"].get("mm_projector_init")),
                   (["features", "pretrained"], config["features"].get("pretrained")))
    named += [(path, value) for path, value in maybe_local if _local(value)]
    roots = config["download"].get("allowed_roots") or []
    named += [(["download", "allowed_roots", i], root) for i, root in enumerate(roots)
              if not root.startswith("package:")]
    return [f"config error: {_where(path)} ({_source(path, files)}): {value} does not exist" for path, value in named
            if value and value not in made and not Path(value).expanduser().exists()]


def benchmark_errors(config: dict, stages: list[str]) -> list[str]:
    """What makes ``evaluate``'s benchmarks unusable, one line each with the key: an unknown stage in
    ``evaluate.stages``, a benchmark name used twice, a judged format (open QA, Video-ChatGPT's benchmark) without
    a ``judge``, a ``judge`` or ``variant`` on a format that has none, or a judge config that
    :func:`pipeline.eval.judge.judge_from_config` refuses (checked without loading the judge)."""
    from pipeline.eval.benchmarks import JUDGED, get
    from pipeline.eval.judge import check_judge_config

    evaluate = config["evaluate"]
    errors = [f"config error: evaluate.stages: {name!r} is not a stage; stages are {stages}"
              for name in evaluate.get("stages") or [] if name not in stages]
    seen: set[str] = set()
    for i, entry in enumerate(evaluate["benchmarks"]):
        where = f"evaluate.benchmarks[{i}] ({entry['name']})"
        if entry["name"] in seen:
            errors.append(f"config error: {where}: the name is used twice")
        seen.add(entry["name"])
        judged = get(entry["format"]).format in JUDGED
        if judged and not entry.get("judge"):
            errors.append(f"config error: {where}: format {entry['format']} is scored by a judge model; set judge")
        elif not judged and entry.get("judge"):
            errors.append(f"config error: {where}: format {entry['format']} has no judge")
        if entry.get("variant") and "videochat_flash" not in get(entry["format"]).options:
            errors.append(f"config error: {where}: format {entry['format']} has no scorer variants")
        if judged and entry.get("judge"):
            try:
                check_judge_config(entry["judge"])
            except ValueError as e:
                errors.append(f"config error: {where}.judge: {e}")
    return errors
