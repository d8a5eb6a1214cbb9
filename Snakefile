# A staged data + training pipeline for LLaVA-style video-LLMs.
#
#   snakemake                            # everything, locally (profiles/default is picked up by itself)
#   snakemake --profile profiles/slurm   # the same on a SLURM cluster
#   snakemake --forcerun train_stage2    # redo one stage and what follows
#   snakemake --report results/report.html
#
# Stages: demo_manifest -> shards -> download -> transcode -> compress -> features -> instructions ->
# train_<stage> ... -> evaluate -> report assets. Rules are thin: each runs `python -m pipeline.<module>`.

import sys

from snakemake.utils import min_version, validate

from pipeline.config import ConfigError, check_config

min_version("9.0")


configfile: "config/config.yaml"


try:  # one line per problem (key, file, closest valid key), before any job
    check_config(config, f"{workflow.basedir}/workflow/schemas/config.schema.yaml", workflow.configfiles)
except ConfigError as error:
    sys.exit(str(error))
validate(config, "workflow/schemas/config.schema.yaml")  # fills in the defaults


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/transcode.smk"
include: "workflow/rules/compress.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/instructions.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets,
