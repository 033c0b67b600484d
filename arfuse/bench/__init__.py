"""Benchmarking and tuning, on top of the public API: the sweep (``runner``), CUDA-graph timing (``timing``), the
unfused peers (``peers``), tables and JSON (``report``), the plot (``plot``) and the tuner (``tuner``).

``arfuse bench`` and ``arfuse tune`` are thin command-line layers over these modules.
"""
