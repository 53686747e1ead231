"""``python -m tec_fast.train``: the command lives in ``tec_fast.cli.train``."""
import sys

from tec_fast.cli.train import *  # noqa: F401,F403
from tec_fast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
