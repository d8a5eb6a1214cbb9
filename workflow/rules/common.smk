# Shared helpers: paths, shard lists, stage lookups. No logic that tests cannot reach: what is more than a lookup
# lives in pipeline/ (pipeline.train.config.resolve_stage).

import json
import sys
from pathlib import Path

from pipeline.config import benchmark_errors, missing_inputs
from pipeline.train.config import resolve_stage

RESULTS = "results"
LOGS = f"{RESULTS}/logs"
BENCHMARKS = f"{RESULTS}/benchmarks"
STAGES = [stage["name"] for stage in config["stages"]]
DATASETS = [dataset["name"] for dataset in config["instructions"]["datasets"]]
EVAL_STAGE = config["evaluate"]["stage"] or STAGES[-1]
STRICT = str(config["data"]["strict"]).lower()
SINGLE_PASS = config["compress"]["single_pass"]
# Whether any stage reads cached features; with online vision only, the features rule has nothing to do, and the
# instructions join with the first stage's compressed videos instead (VISUAL_INDEX, below).
CACHED = any(stage["vision"] == "cached" for stage in config["stages"])
# The per-shard stages in order; single-pass compression reads the downloads and skips transcode.
DATA_STAGES = tuple(stage for stage in ("download", "transcode", "compress", "features")
                    if not (SINGLE_PASS and stage == "transcode") and (CACHED or stage != "features"))
DEMO_MANIFEST = "resources/demo/manifest.tsv"  # written by rule demo_manifest

# The benchmarks every stage of EVAL_STAGES answers (results/eval/<stage>/<benchmark>/); `BENCHMARKS` above is
# Snakemake's benchmark folder, not these.
EVAL_BENCHMARKS = {entry["name"]: entry for entry in config["evaluate"]["benchmarks"]}
EVAL_STAGES = config["evaluate"]["stages"] or STAGES
# Where rule export writes the last stage (export.enabled makes it a target of the whole run).
EXPORT = f"{RESULTS}/export/{STAGES[-1]}_{config['export']['format']}"

if EVAL_STAGE not in STAGES:
    sys.exit(f"config error: evaluate.stage: {EVAL_STAGE!r} is not a stage; stages are {STAGES}")
_errors = benchmark_errors(config, STAGES)
if _errors:
    sys.exit("\n".join(_errors))
_made = {DEMO_MANIFEST, *([config["llm"]["name_or_path"]] if config["llm"]["gguf"] else [])}
_missing = missing_inputs(config, _made, workflow.configfiles)
if _missing:
    sys.exit("\n".join(_missing))


wildcard_constraints:
    shard=r"shard-\d+",
    compressed=r"compress(_\d+px)?",
    stage="|".join(STAGES),
    dataset="|".join(DATASETS),
    benchmark="|".join(EVAL_BENCHMARKS) or "(?!)",


def shard_ids():
    """The shard names, known once checkpoint `shards` has cut the manifest."""
    folder = checkpoints.shards.get().output[0]
    return sorted(path.stem for path in Path(folder).glob("shard-*.tsv"))


def per_shard(pattern):
    """An input function: `pattern` expanded over every shard."""
    return lambda wildcards: expand(pattern, shard=shard_ids())


def stage_config(name):
    """The stage's entry of config["stages"]."""
    return config["stages"][STAGES.index(name)]


def dataset_config(name):
    """The dataset's entry of config["instructions"]["datasets"]."""
    return config["instructions"]["datasets"][DATASETS.index(name)]


def dataset_options(name):
    """The dataset's converter options (pipeline.data.formats.Options) as JSON."""
    keys = ("root", "labels", "images", "split", "video_placement", "timestamps")
    return json.dumps({key: dataset_config(name)[key] for key in keys})


def allowed_roots():
    """Where local sources may be read from: download.allowed_roots, else the manifest's folder."""
    return config["download"]["allowed_roots"] or [str(Path(config["data"]["manifest"]).parent)]


def stage_mix(name):
    """The stage's data mix: [{dataset, records, ratio, max_records}] (the schema fills ratio and max_records),
    every dataset whole when it names none."""
    entries = stage_config(name).get("data") or [{"dataset": dataset} for dataset in DATASETS]
    unknown = [entry["dataset"] for entry in entries if entry["dataset"] not in DATASETS]
    if unknown:
        sys.exit(f"config error: stages[{name}].data: unknown dataset(s) {unknown}; datasets are {DATASETS}")
    return [{**entry, "records": f"{RESULTS}/instructions/{entry['dataset']}/train.json"} for entry in entries]


def stage_init(name):
    """What a training stage starts from: the model folder of its `init` stage, else the base LLM (hub name or
    folder)."""
    init = stage_config(name).get("init")
    return f"{RESULTS}/train/{init}/model" if init else config["llm"]["name_or_path"]


def compressed_folder(size):
    """Where the videos compressed to a short side of `size` px go: results/compress for compress.size, else
    results/compress_<size>px."""
    return "compress" if size in (None, config["compress"]["size"]) else f"compress_{size}px"


def compressed_size(folder):
    """The short side in px of a compressed_folder."""
    return config["compress"]["size"] if folder == "compress" else int(folder[len("compress_"):-len("px")])


def stage_inputs(name):
    """What a training stage reads besides its stage.yaml: the data, its visuals (the features index of a cached
    stage, the compressed videos' index of an online one, at the size its resolution asks for), and the model it
    starts from when a rule makes it (an earlier stage, or the base LLM converted from a GGUF file). The training
    rule passes these paths to the stage; nothing else decides them."""
    made = stage_config(name).get("init") or local_llm()
    return {
        "train": f"{RESULTS}/train/{name}/data.json",
        **stage_visuals(name),
        **({"init": stage_init(name)} if made else {}),
    }


def stage_visuals(name):
    """Where a stage's visuals come from: {"videos": the compressed videos' index at its resolution} for an online
    stage, else {"index": the features index}."""
    stage = stage_config(name)
    if stage["vision"] == "online":
        return {"videos": f"{RESULTS}/{compressed_folder(stage['resolution'])}/index.tsv"}
    return {"index": f"{RESULTS}/features/index.tsv"}


# What the instructions join with: the videos that have features, or with online stages only, the first stage's
# compressed videos.
VISUAL_INDEX = f"{RESULTS}/features/index.tsv" if CACHED else stage_visuals(STAGES[0])["videos"]


def visual_args(input, features_option):
    """A stage's option for its visuals: --videos INDEX (online) or `features_option` INDEX (cached)."""
    return ["--videos", input.videos] if "videos" in input.keys() else [features_option, input.index]


def local_llm():
    """The base LLM folder when a rule makes it (from a GGUF file), else nothing (a hub name or existing folder)."""
    return config["llm"]["name_or_path"] if config["llm"]["gguf"] else None


def all_targets(wildcards):
    """Every product: each shard's videos and features (so that deleting one shard's videos redoes that shard and
    what follows), the stage models, the evaluation and the report assets."""
    return [
        *expand("resources/raw/{shard}", shard=shard_ids()),
        *expand(f"{RESULTS}/{{stage}}/{{shard}}", stage=[s for s in DATA_STAGES if s in ("transcode", "compress")],
                shard=shard_ids()),
        *(expand(f"{RESULTS}/features/{{shard}}.h5", shard=shard_ids()) if CACHED else []),
        *expand(f"{RESULTS}/train/{{stage}}/model", stage=STAGES),
        f"{RESULTS}/eval/metrics.json",
        *benchmark_metrics(),
        *([EXPORT] if config["export"]["enabled"] else []),
        f"{RESULTS}/report/summary.html",
        f"{RESULTS}/report/video_stats.svg",
        *expand(f"{RESULTS}/report/loss_{{stage}}.svg", stage=STAGES),
        f"{RESULTS}/report/rulegraph.svg",
        f"{RESULTS}/report/dag.svg",
    ]


def strip_videos():
    """The compressed videos' index that the report's frame strips read: the last evaluated stage's own (online
    stages), else the compress folder's."""
    return stage_visuals(EVAL_STAGES[-1]).get("videos", f"{RESULTS}/compress/index.tsv")


def benchmark_metrics():
    """Every (stage, benchmark) evaluation's metrics, stage by stage."""
    return expand(f"{RESULTS}/eval/{{stage}}/{{benchmark}}/metrics.json", stage=EVAL_STAGES,
                  benchmark=EVAL_BENCHMARKS)


def benchmark_generation(wildcards):
    """The benchmark's generation settings as JSON (pipeline.eval.generate.GenerationSettings' keys)."""
    return json.dumps(EVAL_BENCHMARKS[wildcards.benchmark]["generation"])


def score_options(wildcards):
    """A benchmark's scoring options: --variant, and for judged formats --judge (JSON) and its cache's path."""
    entry = EVAL_BENCHMARKS[wildcards.benchmark]
    options = ["--variant", entry["variant"]] if entry["variant"] else []
    if entry["judge"]:
        cache = f"{RESULTS}/eval/judgments/{wildcards.stage}/{wildcards.benchmark}.jsonl"
        options += ["--judge", json.dumps(entry["judge"]), "--judge-cache", cache]
    return options


def status_tables(wildcards):
    """Every data stage's status tables, stage by stage."""
    return {stage: expand(f"{RESULTS}/{stage}/{{shard}}.tsv", shard=shard_ids()) for stage in DATA_STAGES}


def summary_stage_args(wildcards):
    """`--stage NAME TABLE...` arguments of the summary page, one per data stage (quoted with :q in the rule)."""
    return [arg for stage, tables in status_tables(wildcards).items() for arg in ("--stage", stage, *tables)]
