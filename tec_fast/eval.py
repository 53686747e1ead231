"""``python -m tec_fast.eval``: the command lives in ``tec_fast.cli.eval``."""
import sys

from tec_fast.cli.eval import *  # noqa: F401,F403
from tec_fast.cli.eval import cli

if __name__ == "__main__":
    sys.exit(cli())
