"""``python -m hmt_runtime.train``: the entry point of ``hmt_runtime.training.train`` (where the code lives)."""
import sys

from .training.train import main

if __name__ == "__main__":
    sys.exit(main())
