"""``python -m tec_fast.info``: the command lives in ``tec_fast.cli.info``."""
import sys

from tec_fast.cli.info import *  # noqa: F401,F403
from tec_fast.cli.info import main

if __name__ == "__main__":
    sys.exit(main())
