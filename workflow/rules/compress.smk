rule compress:
    """Every video of a shard to compress.fps frames/s, short side compress.size px, no audio (from the transcoded
    mp4s, or single-pass from the downloads)."""
    input:
        status=f"{RESULTS}/download/{{shard}}.tsv" if SINGLE_PASS else f"{RESULTS}/transcode/{{shard}}.tsv",
        videos="resources/raw/{shard}" if SINGLE_PASS else f"{RESULTS}/transcode/{{shard}}",
    output:
        status=f"{RESULTS}/compress/{{shard}}.tsv",
        videos=directory(f"{RESULTS}/compress/{{shard}}"),
    params:
        fps=config["compress"]["fps"],
        size=config["compress"]["size"],
        crf=config["compress"]["crf"],
        preset=config["compress"]["preset"],
        video=VIDEO_OPTIONS,
        strict=STRICT,
    threads: 4
    resources:
        mem_mb=4000,
        runtime=120,
    log:
        f"{LOGS}/compress/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/compress/{{shard}}.tsv"
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.video.compress --input {input.status} --out-dir {output.videos} --status {output.status}"
        " --fps {params.fps} --size {params.size} --crf {params.crf} --preset {params.preset} --threads {threads}"
        " {params.video} {params.strict} > {log} 2>&1"
