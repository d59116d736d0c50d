"""``python -m hmt_runtime.diagnose``: the entry point of ``hmt_runtime.training.diagnose`` (where the code lives)."""
import sys

from .training.diagnose import main

if __name__ == "__main__":
    sys.exit(main())
