rule evaluate:
    """Answer the val splits' questions with the evaluated stage; exact match and token F1, no paid API."""
    input:
        model=f"{RESULTS}/train/{EVAL_STAGE}/model",
        records=expand(f"{RESULTS}/instructions/{{dataset}}/val.json", dataset=DATASETS),
        **stage_visuals(EVAL_STAGE),
    output:
        metrics=f"{RESULTS}/eval/metrics.json",
        predictions=f"{RESULTS}/eval/predictions.jsonl",
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
        visual=lambda wildcards, input: visual_args(input, "--index"),
        max_new_tokens=config["evaluate"]["max_new_tokens"],
        batch_size=config["evaluate"]["batch_size"],
    threads: config["evaluate"]["resources"]["cpus"]
    resources:
        gpu=min(1, config["evaluate"]["resources"]["gpus"]),
        mem_mb=config["evaluate"]["resources"]["mem_mb"],
        runtime=config["evaluate"]["resources"]["runtime"],
    log:
        f"{LOGS}/evaluate.log",
    benchmark:
        f"{BENCHMARKS}/evaluate.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.eval.generate --model {input.model:q} --records {input.records:q} {params.visual:q}"
        " --out-dir {params.out_dir:q} --max-new-tokens {params.max_new_tokens:q} --batch-size {params.batch_size:q}"
        " > {log:q} 2>&1"
