"""dehaze pipeline: stage 1 codebook → stage 2 code prediction → stage 3 QualiTeacher → eval → registry.

    python pipelines/dehaze.py --preset demo [--stage3.model.w_pref=0.5 ...]
"""
import sys

from qualiteacher.pipeline.cli import run_pipeline_cli

if __name__ == "__main__":
    sys.exit(run_pipeline_cli("dehaze", sys.argv[1:]))
