rule features:
    """CLIP spatio-temporal features of a shard's compressed videos, one HDF5 file per shard."""
    input:
        status=f"{RESULTS}/compress/{{shard}}.tsv",
        videos=f"{RESULTS}/compress/{{shard}}",
    output:
        status=f"{RESULTS}/features/{{shard}}.tsv",
        features=f"{RESULTS}/features/{{shard}}.h5",
    params:
        config=json.dumps({k: v for k, v in config["features"].items() if k != "resources"}),
        strict=STRICT,
    threads: config["features"]["resources"]["cpus"]
    resources:
        gpu=min(1, config["features"]["resources"]["gpus"]),
        mem_mb=config["features"]["resources"]["mem_mb"],
        runtime=config["features"]["resources"]["runtime"],
    log:
        f"{LOGS}/features/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/features/{{shard}}.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.features.extract shard --input {input.status:q} --out {output.features:q}"
        " --status {output.status:q} --config {params.config:q} --threads {threads} --strict {params.strict:q}"
        " > {log:q} 2>&1"


rule features_index:
    """Map every video with features to its shard file, for random access in training, after verifying every
    shard (a deleted or damaged shard file is remade or named here, not in training)."""
    input:
        status=per_shard(f"{RESULTS}/features/{{shard}}.tsv"),
        shards=per_shard(f"{RESULTS}/features/{{shard}}.h5"),
    output:
        f"{RESULTS}/features/index.tsv",
    log:
        f"{LOGS}/features_index.log",
    benchmark:
        f"{BENCHMARKS}/features_index.tsv"
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.features.extract index --out {output:q} {input.status:q} > {log:q} 2>&1"
