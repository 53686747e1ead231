"""The trainer's library: ``fit`` (the loop every objective shares) and the small modules around
it, one job each: ``config`` (FitConfig / FitResult), ``distributed`` (torchrun, DDP / FSDP2),
``sampling`` (data order, per-sample seeds, masking noise), ``state`` (RNG state, resume),
``faults`` (non-finite loss, signals), ``checkpoints`` (rotation), ``objectives`` (what a step
computes), ``optim`` (AdamW and the schedule), ``monitor`` (progress, metrics log, tables)."""
from tec_fast.training.checkpoints import (
                                        CHECKPOINT_FORMAT,
                                        LAST_CHECKPOINT,
                                        CheckpointManager,
)
from tec_fast.training.config import FitConfig, FitResult
from tec_fast.training.distributed import (
                                        DistInfo,
                                        cleanup_distributed,
                                        setup_distributed,
)
from tec_fast.training.faults import NonFiniteLoss, TrainingInterrupted
from tec_fast.training.loader_bench import bench_loader
from tec_fast.training.loop import fit
from tec_fast.training.sampling import (
                                        ResumableBatchSampler,
                                        ResumableSampler,
                                        SeededSamples,
                                        masking_noise,
                                        mix_seed,
)
from tec_fast.training.state import (
                                        resolve_resume,
                                        rng_state,
                                        seed_everything,
                                        set_rng_state,
)

__all__ = ["CHECKPOINT_FORMAT", "LAST_CHECKPOINT", "CheckpointManager", "FitConfig", "FitResult",
           "DistInfo", "cleanup_distributed", "setup_distributed", "NonFiniteLoss",
           "TrainingInterrupted", "bench_loader", "fit", "ResumableBatchSampler", "ResumableSampler",
           "SeededSamples", "masking_noise", "mix_seed", "resolve_resume", "rng_state",
           "seed_everything", "set_rng_state"]
