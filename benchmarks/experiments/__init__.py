"""Experiments on the demo data (not benchmarks: they train and evaluate models, and take minutes
to hours): the demo's seeds, its tuning, and the paper's protocol at demo scale. Run them as
modules from the repository root, e.g. ``python -m benchmarks.experiments.repro``."""

import argparse
from typing import Callable, List


def int_list(one: Callable[[str], int]) -> Callable[[str], List[int]]:
    """A flag type: comma-separated integers, each checked by ``one`` (e.g. ``tec_fast.cli.flags.SEED``),
    at least one, none given twice; refused at parse time (``error: argument --FLAG: ...``)."""
    def parse(text: str) -> List[int]:
        values = [one(part.strip()) for part in text.split(",")]  # ArgumentTypeError names the bad one
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value given twice in {text!r}")
        return values
    parse.__name__ = "list"
    return parse
