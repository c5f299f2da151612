# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The parallel layout a model factory builds its layers for.

A factory registered with `ModelRegistry.register_model` receives a
`ParallelContext` so that code written for training (plain PyTorch,
Megatron-core, TorchTitan) can shard its layers over the very process groups
vLLM set up, instead of creating groups of its own.
"""

from dataclasses import dataclass

import torch
import torch.distributed

from vllm.config import VllmConfig


@dataclass(frozen=True)
class ParallelContext:
    """Ranks, sizes and process groups of the worker building the model.

    `*_group` are the groups collectives run on (NCCL on CUDA, gloo on the
    CPU); `*_cpu_group` are gloo groups for host-side metadata. Outside a
    vLLM worker (torch.distributed not initialised, e.g. a reference run of
    the same model) every rank is 0, every size 1 and every group `None`, so
    the factory builds the whole, unsharded model.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    tp_group: torch.distributed.ProcessGroup | None = None
    tp_cpu_group: torch.distributed.ProcessGroup | None = None
    pp_group: torch.distributed.ProcessGroup | None = None
    pp_cpu_group: torch.distributed.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def shard_size(self, size: int, what: str = "dimension") -> int:
        """`size` split evenly over the TP ranks, or a clear error."""
        if size % self.tp_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by tensor_parallel_size "
                f"({self.tp_size}); choose a tensor_parallel_size that "
                f"divides {size}."
            )
        return size // self.tp_size

    @classmethod
    def from_vllm_config(cls, vllm_config: VllmConfig) -> "ParallelContext":
        from vllm.distributed import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return cls(device=_config_device(vllm_config))
        tp = parallel_state.get_tp_group()
        pp = parallel_state.get_pp_group()
        parallel_config = vllm_config.parallel_config
        return cls(
            tp_rank=tp.rank_in_group,
            tp_size=tp.world_size,
            pp_rank=pp.rank_in_group,
            pp_size=pp.world_size,
            tp_group=tp.device_group,
            tp_cpu_group=tp.cpu_group,
            pp_group=pp.device_group,
            pp_cpu_group=pp.cpu_group,
            dp_rank=parallel_config.data_parallel_rank,
            dp_size=parallel_config.data_parallel_size,
            device=tp.device,
        )


def _config_device(vllm_config: VllmConfig) -> torch.device:
    device_config = vllm_config.device_config
    if isinstance(device_config.device, torch.device):
        return device_config.device
    return torch.device(getattr(device_config, "device_type", None) or "cpu")
