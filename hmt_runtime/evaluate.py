"""``python -m hmt_runtime.evaluate``: the entry point of ``hmt_runtime.training.evaluate`` (where the code lives)."""
import sys

from .training.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
