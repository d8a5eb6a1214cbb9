rule instructions:
    """One dataset's annotations -> validated LLaVA conversations joined with the features, split into train/val by
    video; rejected records with their reasons."""
    input:
        annotations=lambda wildcards: dataset_config(wildcards.dataset)["annotations"],
        index=f"{RESULTS}/features/index.tsv",
    output:
        train=f"{RESULTS}/instructions/{{dataset}}/train.json",
        val=f"{RESULTS}/instructions/{{dataset}}/val.json",
        rejected=f"{RESULTS}/instructions/{{dataset}}/rejected.jsonl",
        counts=f"{RESULTS}/instructions/{{dataset}}/counts.json",
    params:
        format=lambda wildcards: dataset_config(wildcards.dataset)["format"],
        options=lambda wildcards: dataset_options(wildcards.dataset),
        val_fraction=config["instructions"]["val_fraction"],
        seed=config["instructions"]["seed"],
        out_dir=lambda wildcards, output: Path(output.counts).parent,
    log:
        f"{LOGS}/instructions/{{dataset}}.log",
    benchmark:
        f"{BENCHMARKS}/instructions/{{dataset}}.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.data.instructions --annotations {input.annotations} --format {params.format}"
        " --index {input.index} --out-dir {params.out_dir} --val-fraction {params.val_fraction}"
        " --seed {params.seed} --options {params.options} > {log} 2>&1"


rule stage_data:
    """A stage's training records: its mix of the datasets' train splits (ratios, caps, the stage's seed)."""
    input:
        lambda wildcards: [f"{RESULTS}/instructions/{entry['dataset']}/train.json" for entry in stage_mix(wildcards.stage)],
    output:
        data=f"{RESULTS}/train/{{stage}}/data.json",
        counts=f"{RESULTS}/train/{{stage}}/data_counts.json",
    params:
        spec=lambda wildcards: shlex.quote(json.dumps(stage_mix(wildcards.stage))),
        seed=lambda wildcards: stage_config(wildcards.stage).get("seed", 0),
    log:
        f"{LOGS}/stage_data/{{stage}}.log",
    benchmark:
        f"{BENCHMARKS}/stage_data/{{stage}}.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.data.mixing --spec {params.spec} --seed {params.seed} --out {output.data}"
        " --counts {output.counts} > {log} 2>&1"
