"""The tensor-parallel model demo behind ``arfuse e2e``: a plain Llama-style decoder (``llama``), tensor
parallelism and the norm-path switch (``tp``), TTFT/TPOT timing (``timing``), greedy decoding and the
agreement check between norm paths (``generate``)."""
