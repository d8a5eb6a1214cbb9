rule transcode:
    """Every downloaded video of a shard to H.264 mp4 (yuv420p, faststart); segments are cut here."""
    input:
        status=f"{RESULTS}/download/{{shard}}.tsv",
        videos="resources/raw/{shard}",
    output:
        status=f"{RESULTS}/transcode/{{shard}}.tsv",
        videos=directory(f"{RESULTS}/transcode/{{shard}}"),
    params:
        crf=config["transcode"]["crf"],
        preset=config["transcode"]["preset"],
        video=VIDEO_OPTIONS,
        strict=STRICT,
    threads: 4
    resources:
        mem_mb=4000,
        runtime=120,
    log:
        f"{LOGS}/transcode/{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/transcode/{{shard}}.tsv"
    conda:
        "../../envs/video.yaml"
    shell:
        "python -m pipeline.video.transcode --input {input.status} --out-dir {output.videos} --status {output.status}"
        " --crf {params.crf} --preset {params.preset} --threads {threads} {params.video} {params.strict} > {log} 2>&1"
