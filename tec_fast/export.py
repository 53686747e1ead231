"""``python -m tec_fast.export``: the command lives in ``tec_fast.cli.export``."""
import sys

from tec_fast.cli.export import *  # noqa: F401,F403
from tec_fast.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
