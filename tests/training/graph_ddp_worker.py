"""One process of test_cuda_graph.py's DDP test, launched by torchrun (not a test itself).

argv: OUT_JSON BATCH_PER_PROCESS ACCUM. fit's CUDA-graph path under DDP (gloo, CPU) with the
recording emulated (graph_emulation.py) and two eager steps before it; rank 0 writes the
per-step global losses, the weights' checksum and how many replays ran to OUT_JSON."""
from __future__ import annotations

import os
import sys

import torch

import tec_fast.training.graphed as graphed
import tec_fast.training.loop as loop
from graph_emulation import emulated_step_class
from tec_fast.training import FitConfig, cleanup_distributed, fit, setup_distributed
from train_helpers import AugmentedImages, tiny_objective, tiny_tec, write_rank0_summary


def phase(what: str) -> None:
    """Where this rank is, on stderr (which the test shows when the launch fails): gloo has
    aborted this worker under load (exit -6), and the phase it reached says where to look."""
    print(f"[rank {os.environ.get('RANK', '?')}] {what}", file=sys.stderr, flush=True)


def main() -> None:
    out, batch, accum = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    d = setup_distributed("cpu")
    phase("process group up")
    step_class = emulated_step_class()
    loop.GraphedStep = step_class
    real_plan = loop.plan_graphs
    loop.plan_graphs = lambda cfg, device, *a: real_plan(cfg, torch.device("cuda"), *a)  # CPU stands in
    graphed.DDP_EAGER_STEPS = 2
    cfg = FitConfig(name="ddp", epochs=2, batch_size=batch, accum=accum, lr=2e-3, warmup_steps=2,
                    seed=3, progress=False, log_every=1, cuda_graph="on")
    r = fit(tiny_tec(), tiny_objective(), AugmentedImages(n=32), cfg)
    phase("fit returned")
    (step,) = step_class.instances
    write_rank0_summary(d, r, "ddp", out, replays=step.replays, status=r.cuda_graph,
                        local_replays=step.fwd_bwd_local.replays if step.fwd_bwd_local else 0)
    phase("result written")
    # the emulated step class keeps its instances (and through them the DDP module and its process
    # group) alive until interpreter teardown, where gloo's threads can abort the process (exit -6
    # after the work is done: "terminate called without an active exception", seen in full-suite
    # runs, not alone): let them go while the process group is still up ...
    step_class.instances.clear()
    del step, r
    cleanup_distributed(barrier=True)
    phase("process group shut down")


if __name__ == "__main__":
    main()
    # ... and leave without the interpreter's teardown once the result is written and every rank
    # has shut its process group down (the CPU stand-in for CUDA graphs exists only in tests)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
