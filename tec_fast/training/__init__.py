"""The trainer's library: ``fit`` (the loop every objective shares) and the small modules around
it, one job each: ``config`` (FitConfig / FitResult), ``distributed`` (torchrun, DDP / FSDP2),
``sampling`` (data order, per-sample seeds, masking noise), ``state`` (position, RNG state,
finding the checkpoint to resume), ``saving`` (what a checkpoint holds, the finite-weights check,
resuming), ``faults`` (non-finite loss or weights, signals), ``checkpoints`` (rotation, writes),
``objectives`` (the ``Objective`` protocol and its implementations), ``builders`` (one builder per
objective for the train command), ``optim`` (AdamW and the schedule), ``monitor`` (progress,
metrics log, tables)."""
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
from tec_fast.training.faults import (
                                        NonFiniteLoss,
                                        NonFiniteTraining,
                                        NonFiniteWeights,
                                        TrainingInterrupted,
)
from tec_fast.training.loader_bench import bench_loader
from tec_fast.training.loop import fit
from tec_fast.training.objectives import Objective
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
           "DistInfo", "cleanup_distributed", "setup_distributed", "NonFiniteLoss", "NonFiniteTraining",
           "NonFiniteWeights", "Objective",
           "TrainingInterrupted", "bench_loader", "fit", "ResumableBatchSampler", "ResumableSampler",
           "SeededSamples", "masking_noise", "mix_seed", "resolve_resume", "rng_state",
           "seed_everything", "set_rng_state"]
