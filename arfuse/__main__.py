"""``python -m arfuse``: the ``arfuse`` command line."""
import sys

from arfuse.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
