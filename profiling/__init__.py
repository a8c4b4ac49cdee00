"""Throughput benchmarks: measured side by side in one run, reported as ratios (machines are shared).

`iak-dist profile CONFIG` runs `profiling.throughput.run_profile`; the scripts beside it
(`largest_table.py`, `finetune_cost.py`) are standalone benchmarks.
"""
