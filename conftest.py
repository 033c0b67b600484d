"""pytest wiring for the doctests under arfuse/ (kept out of the package, so the wheel does not ship it): skip
modules whose optional dependency (Triton) is missing here."""
import importlib.util

collect_ignore_glob = []
if importlib.util.find_spec("triton") is None:
    collect_ignore_glob += ["arfuse/kernels/*.py", "arfuse/testing/sync_standins.py"]
