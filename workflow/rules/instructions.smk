rule instructions:
    """One dataset's annotations -> validated LLaVA conversations joined with the videos that have features (or,
    when every stage has online vision, that compressed), split into train/val by video; rejected records with
    their reasons."""
    input:
        annotations=lambda wildcards: dataset_config(wildcards.dataset)["annotations"],
        index=VISUAL_INDEX,
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
        "python -m pipeline.data.instructions --annotations {input.annotations:q} --format {params.format:q}"
        " --index {input.index:q} --out-dir {params.out_dir:q} --val-fraction {params.val_fraction:q}"
        " --seed {params.seed:q} --options {params.options:q} > {log:q} 2>&1"


rule stage_data:
    """A stage's training records: its mix of the datasets' train splits (ratios, caps, the stage's seed)."""
    input:
        lambda wildcards: [f"{RESULTS}/instructions/{entry['dataset']}/train.json" for entry in stage_mix(wildcards.stage)],
    output:
        data=f"{RESULTS}/train/{{stage}}/data.json",
        counts=f"{RESULTS}/train/{{stage}}/data_counts.json",
    params:
        spec=lambda wildcards: json.dumps(stage_mix(wildcards.stage)),
        seed=lambda wildcards: stage_config(wildcards.stage)["seed"],
    log:
        f"{LOGS}/stage_data/{{stage}}.log",
    benchmark:
        f"{BENCHMARKS}/stage_data/{{stage}}.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.data.mixing --spec {params.spec:q} --seed {params.seed:q} --out {output.data:q}"
        " --counts {output.counts:q} > {log:q} 2>&1"
