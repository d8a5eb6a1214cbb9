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
        timeout=config["data"]["video_timeout"],
        max_decode_errors=config["data"]["max_decode_errors"],
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
        "python -m pipeline.video.transcode --input {input.status:q} --out-dir {output.videos:q}"
        " --status {output.status:q} --crf {params.crf:q} --preset {params.preset:q} --threads {threads}"
        " --timeout {params.timeout:q} --max-decode-errors {params.max_decode_errors:q} --strict {params.strict:q}"
        " > {log:q} 2>&1"
