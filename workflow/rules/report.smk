# Assets of `snakemake --report results/report.html`: loss curves, the summary page, the rule graph and the DAG.


rule loss_plot:
    """A training stage's loss and learning-rate curves."""
    input:
        f"{RESULTS}/train/{{stage}}/loss.tsv",
    output:
        report(
            f"{RESULTS}/report/loss_{{stage}}.svg",
            caption="../report/loss.rst",
            category="Training",
            labels={"stage": "{stage}"},
        ),
    log:
        f"{LOGS}/loss_plot/{{stage}}.log",
    benchmark:
        f"{BENCHMARKS}/loss_plot/{{stage}}.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.report loss --loss {input:q} --stage {wildcards.stage:q} --out {output:q} > {log:q} 2>&1"


rule video_stats:
    """Duration, frame rate, resolution and codec of the downloaded videos."""
    input:
        per_shard(f"{RESULTS}/download/{{shard}}.tsv"),
    output:
        report(f"{RESULTS}/report/video_stats.svg", caption="../report/video_stats.rst", category="Data and evaluation"),
    log:
        f"{LOGS}/video_stats.log",
    benchmark:
        f"{BENCHMARKS}/video_stats.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.report video-stats --out {output:q} {input:q} > {log:q} 2>&1"


rule summary:
    """Videos kept and failed per data stage, instruction records kept and rejected, evaluation metrics and
    predictions, the stages x benchmarks table with sample predictions and their frames, and what each rule cost (after the other report assets, so that their jobs are counted too)."""
    input:
        unpack(status_tables),
        rejected=f"{RESULTS}/shards",
        instructions=expand(f"{RESULTS}/instructions/{{dataset}}/counts.json", dataset=DATASETS),
        mixes=expand(f"{RESULTS}/train/{{stage}}/data_counts.json", stage=STAGES),
        metrics=f"{RESULTS}/eval/metrics.json",
        predictions=f"{RESULTS}/eval/predictions.jsonl",
        eval_metrics=benchmark_metrics(),
        eval_predictions=[path.replace("metrics.json", "predictions.jsonl") for path in benchmark_metrics()],
        videos=strip_videos(),  # the frame strips of the benchmarks' sample predictions
        assets=[f"{RESULTS}/report/video_stats.svg", *expand(f"{RESULTS}/report/loss_{{stage}}.svg", stage=STAGES),
                f"{RESULTS}/report/rulegraph.svg"],
    output:
        report(f"{RESULTS}/report/summary.html", caption="../report/summary.rst", category="Data and evaluation"),
    params:
        stages=summary_stage_args,
        benchmarks=BENCHMARKS,
        train_metrics=expand(f"{RESULTS}/train/{{stage}}/train_metrics.json", stage=STAGES),
    log:
        f"{LOGS}/summary.log",
    benchmark:
        f"{BENCHMARKS}/summary.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.report summary {params.stages:q} --manifest-rejected {input.rejected:q}/rejected.tsv"
        " --instructions {input.instructions:q} --mixes {input.mixes:q} --metrics {input.metrics:q}"
        " --predictions {input.predictions:q} --benchmarks {params.benchmarks:q}"
        " --train-metrics {params.train_metrics:q} --eval-metrics {input.eval_metrics:q}"
        " --eval-predictions {input.eval_predictions:q} --videos-index {input.videos:q} --out {output:q} > {log:q} 2>&1"


rule run_config:
    """The config this run resolved (defaults filled in), for the report and the graph rules."""
    output:
        f"{RESULTS}/report/config.yaml",
    params:
        config=config,
    log:
        f"{LOGS}/run_config.log",
    localrule: True
    run:
        write_yaml(output[0], params.config)
        Path(log[0]).write_text(f"wrote {Path(output[0])}\n")


rule report_graphs:
    """The rule graph and the job DAG of this workflow, rendered by graphviz; in the DAG, a rule of more than 8
    jobs (the per-shard stages of a large run) is one node with its job count."""
    input:
        config=f"{RESULTS}/report/config.yaml",
        shards=f"{RESULTS}/shards",  # after the checkpoint, so that the DAG shows every shard's jobs
    output:
        rulegraph=report(f"{RESULTS}/report/rulegraph.svg", caption="../report/rulegraph.rst", category="Workflow graphs"),
        dag=report(f"{RESULTS}/report/dag.svg", caption="../report/dag.rst", category="Workflow graphs"),
    log:
        f"{LOGS}/report_graphs.log",
    benchmark:
        f"{BENCHMARKS}/report_graphs.tsv"
    localrule: True
    conda:
        "../../envs/video.yaml"
    shell:
        "(python -m snakemake --nolock --quiet all --configfile {input.config:q} --rulegraph"
        " | dot -Tsvg > {output.rulegraph:q}"
        " && python -m snakemake --nolock --quiet all --configfile {input.config:q} --dag"
        " | python -m pipeline.report collapse-dag | dot -Tsvg > {output.dag:q}) 2> {log:q}"
