"""Process groups (world, tp, sp) and the collectives the parallel layers use."""

from fastvideo.distributed.communication_op import (
    sequence_model_parallel_all_gather,
    sequence_model_parallel_shard,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from fastvideo.distributed.parallel_state import (
    GroupCoordinator,
    destroy_distributed_environment,
    destroy_model_parallel,
    get_sp_group,
    get_sp_rank,
    get_sp_world_size,
    get_tp_group,
    get_tp_rank,
    get_tp_world_size,
    get_world_group,
    init_distributed_environment,
    initialize_model_parallel,
    maybe_init_distributed_environment_and_model_parallel,
    model_parallel_is_initialized,
)
from fastvideo.distributed.utils import divide

__all__ = [
    "GroupCoordinator",
    "destroy_distributed_environment",
    "destroy_model_parallel",
    "divide",
    "get_sp_group",
    "get_sp_rank",
    "get_sp_world_size",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_world_size",
    "get_world_group",
    "init_distributed_environment",
    "initialize_model_parallel",
    "maybe_init_distributed_environment_and_model_parallel",
    "model_parallel_is_initialized",
    "sequence_model_parallel_all_gather",
    "sequence_model_parallel_shard",
    "tensor_model_parallel_all_gather",
    "tensor_model_parallel_all_reduce",
]
