"""Auto-fusion for existing models: :func:`compile` installs an Inductor pass that rewrites a TP model's
allreduce + residual add + RMSNorm into arfuse calls; :func:`compile_report` says what it did and why.

Modules: ``patterns`` (what is matched, as data), ``spellings`` (the torch code the patterns are traced from),
``tracing`` (tracing it into pattern expressions), ``views`` (the shape-only ops a match looks through),
``checks`` (what a match must also satisfy), ``replace`` and ``ops`` (what replaces it: one op,
``arfuse::autofused``, running on the fusion objects of :mod:`arfuse.fusions`), ``graph_pass`` (the pass), ``explain`` and ``report`` (the compile report), ``compiler`` (the entry
point). Only ``compiler`` and ``report`` load at
``import arfuse``; the rest (Inductor's pattern matcher) loads with the first :func:`compile`.
"""
from arfuse.autofuse.compiler import DEFAULT_MAX_TOKENS, compile
from arfuse.autofuse.report import CompileReport, clear as clear_report, compile_report

__all__ = ["DEFAULT_MAX_TOKENS", "CompileReport", "clear_report", "compile", "compile_report"]
