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


rule answer_benchmark:
    """A stage's answers to a benchmark's questions (its videos' features read once for all their questions); a
    question whose video failed upstream is a row with its reason, not dropped."""
    input:
        unpack(lambda wildcards: stage_visuals(wildcards.stage)),
        model=f"{RESULTS}/train/{{stage}}/model",
        annotations=lambda wildcards: EVAL_BENCHMARKS[wildcards.benchmark]["annotations"],
        status=lambda wildcards: [table for tables in status_tables(wildcards).values() for table in tables],
    output:
        f"{RESULTS}/eval/{{stage}}/{{benchmark}}/predictions.jsonl",
    params:
        visual=lambda wildcards, input: visual_args(input, "--index"),
        format=lambda wildcards: EVAL_BENCHMARKS[wildcards.benchmark]["format"],
        root=lambda wildcards: ["--root", EVAL_BENCHMARKS[wildcards.benchmark]["root"]]
        if EVAL_BENCHMARKS[wildcards.benchmark]["root"] else [],
        generation=benchmark_generation,
    threads: config["evaluate"]["resources"]["cpus"]
    resources:
        gpu=min(1, config["evaluate"]["resources"]["gpus"]),
        mem_mb=config["evaluate"]["resources"]["mem_mb"],
        runtime=config["evaluate"]["resources"]["runtime"],
    log:
        f"{LOGS}/answer_benchmark/{{stage}}/{{benchmark}}.log",
    benchmark:
        f"{BENCHMARKS}/answer_benchmark/{{stage}}/{{benchmark}}.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.eval.run answer --benchmark {params.format:q} --annotations {input.annotations:q}"
        " {params.root:q} --model {input.model:q} {params.visual:q} --status {input.status:q}"
        " --generation {params.generation:q} --out {output:q} > {log:q} 2>&1"


rule score_benchmark:
    """The benchmark's metrics of a stage's answers, computed as the benchmark's scorer does (judged formats: by
    the configured judge, its judgments cached so that a rerun asks nothing twice)."""
    input:
        predictions=f"{RESULTS}/eval/{{stage}}/{{benchmark}}/predictions.jsonl",
        annotations=lambda wildcards: EVAL_BENCHMARKS[wildcards.benchmark]["annotations"],
    output:
        f"{RESULTS}/eval/{{stage}}/{{benchmark}}/metrics.json",
    params:
        format=lambda wildcards: EVAL_BENCHMARKS[wildcards.benchmark]["format"],
        options=lambda wildcards: score_options(wildcards),
    threads: config["evaluate"]["resources"]["cpus"]
    resources:
        gpu=lambda wildcards: min(1, config["evaluate"]["resources"]["gpus"])
        if (EVAL_BENCHMARKS[wildcards.benchmark]["judge"] or {}).get("kind") == "hf" else 0,
        mem_mb=config["evaluate"]["resources"]["mem_mb"],
        runtime=config["evaluate"]["resources"]["runtime"],
    log:
        f"{LOGS}/score_benchmark/{{stage}}/{{benchmark}}.log",
    benchmark:
        f"{BENCHMARKS}/score_benchmark/{{stage}}/{{benchmark}}.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.eval.run score --benchmark {params.format:q} --annotations {input.annotations:q}"
        " --predictions {input.predictions:q} --stage {wildcards.stage:q} --name {wildcards.benchmark:q}"
        " {params.options:q} --out {output:q}"
        " > {log:q} 2>&1"
