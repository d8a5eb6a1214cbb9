rule instructions:
    """Annotations -> validated LLaVA conversations joined with the features, split into train/val by video."""
    input:
        annotations=config["instructions"]["annotations"],
        index=f"{RESULTS}/features/index.tsv",
    output:
        train=f"{RESULTS}/instructions/train.json",
        val=f"{RESULTS}/instructions/val.json",
        rejected=f"{RESULTS}/instructions/rejected.jsonl",
        counts=f"{RESULTS}/instructions/counts.json",
    params:
        format=config["instructions"]["format"],
        val_fraction=config["instructions"]["val_fraction"],
        seed=config["instructions"]["seed"],
        out_dir=lambda wildcards, output: Path(output[0]).parent,
    log:
        f"{LOGS}/instructions.log",
    benchmark:
        f"{BENCHMARKS}/instructions.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.data.instructions --annotations {input.annotations} --format {params.format}"
        " --index {input.index} --out-dir {params.out_dir} --val-fraction {params.val_fraction}"
        " --seed {params.seed} > {log} 2>&1"
