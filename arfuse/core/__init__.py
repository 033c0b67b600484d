"""Bottom layer: plain types, errors, counters and input validation. Imports nothing else from arfuse."""
