"""``python -m tec_fast.make_shards``: the command lives in ``tec_fast.cli.make_shards``."""
import sys

from tec_fast.cli.make_shards import main

if __name__ == "__main__":
    sys.exit(main())
