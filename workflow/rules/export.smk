rule export:
    """The last stage exported for serving (python -m pipeline.export): `hf`, a Hugging Face folder of our
    registered classes, or `llava_next_video`, a LlavaNextVideoForConditionalGeneration folder plain transformers
    (and vLLM, SGLang) load, for stages of that architecture only (the job fails saying which part has none)."""
    input:
        f"{RESULTS}/train/{STAGES[-1]}/model",
    output:
        directory(EXPORT),
    params:
        format=config["export"]["format"],
        dtype=config["export"]["dtype"],
    log:
        f"{LOGS}/export.log",
    benchmark:
        f"{BENCHMARKS}/export.tsv"
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m pipeline.export --stage {input:q} --out {output:q} --format {params.format:q}"
        " --dtype {params.dtype:q} > {log:q} 2>&1"
