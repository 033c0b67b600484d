"""Bottom layer: Triton kernels and their thin launchers. Importing a kernel module needs Triton; backends import
them lazily. Inline PTX is used only for what Triton lacks: system-scope acquire/release flags and the timer."""
