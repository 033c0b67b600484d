"""Bottom layer: what this machine, this group and the installed packages can do. Probes never raise."""
