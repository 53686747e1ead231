"""Experiments on the demo data (not benchmarks: they train and evaluate models, and take minutes
to hours): the demo's seeds, its tuning, and the paper's protocol at demo scale. Run them as
modules from the repository root, e.g. ``python -m benchmarks.experiments.repro``."""
