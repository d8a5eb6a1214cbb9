rule compress:
    """Every video of a shard to compress.fps frames/s, short side compress.size px (results/compress), or the
    size an online stage's resolution asks for (results/compress_<size>px, each size once), no audio (from the
    transcoded mp4s, or single-pass from the downloads)."""
    input:
        status=f"{RESULTS}/download/{{shard}}.tsv" if SINGLE_PASS else f"{RESULTS}/transcode/{{shard}}.tsv",
        videos="resources/raw/{shard}" if SINGLE_PASS else f"{RESULTS}/transcode/{{shard}}",
    output:
        status=f"{RESULTS}/{{compressed}}/{{shard}}.tsv",
        videos=directory(f"{RESULTS}/{{compressed}}/{{shard}}"),
    params:
        fps=config["compress"]["fps"],
        size=lambda wildcards: compressed_size(wildcards.compressed),
        crf=config["compress"]["crf"],
        preset=config["compress"]["preset"],
        timeout=config["data"]["video_timeout"],
        max_decode_errors=config["data"]["max_decode_errors"],
        strict=STRICT,
    threads: 4
    resources:
        mem_mb=4000,
        runtime=120,
    log:
        f"{LOGS}/{{compressed}}/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/{{compressed}}/{{shard}}.tsv"
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.video.compress --input {input.status:q} --out-dir {output.videos:q}"
        " --status {output.status:q} --fps {params.fps:q} --size {params.size:q} --crf {params.crf:q}"
        " --preset {params.preset:q} --threads {threads} --timeout {params.timeout:q}"
        " --max-decode-errors {params.max_decode_errors:q} --strict {params.strict:q} > {log:q} 2>&1"


rule videos_index:
    """The compressed videos of every shard (video_id, path, frames, fps, duration): what online stages read."""
    input:
        lambda wildcards: expand(f"{RESULTS}/{{compressed}}/{{shard}}.tsv", compressed=wildcards.compressed,
                                 shard=shard_ids()),
    output:
        f"{RESULTS}/{{compressed}}/index.tsv",
    log:
        f"{LOGS}/{{compressed}}/index.log",
    localrule: True
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.video.index --out {output:q} {input:q} > {log:q} 2>&1"
