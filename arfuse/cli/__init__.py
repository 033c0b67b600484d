"""The ``arfuse`` command line: demo, doctor, bench, tune, e2e. Uses the public API only (doctor also reads
``probe`` and ``select``)."""
