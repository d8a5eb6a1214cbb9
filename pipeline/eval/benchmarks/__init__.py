"""Benchmark scorers: one module per benchmark's own annotation and prediction format (``etbench``: E.T. Bench).

Each module reads the benchmark's files as its authors ship them and reproduces its official scoring script;
``pipeline.eval.score`` is the command line that picks one by name.
"""
