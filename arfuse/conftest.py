"""Doctest collection: skip modules whose optional dependency (Triton, FlashInfer) is missing here."""
import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("triton") is None:
    collect_ignore_glob += ["kernels/*.py"]
