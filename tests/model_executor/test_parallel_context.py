# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""`ParallelContext`: what a model factory sees outside a vLLM worker (the
whole model, on the configured device) and the error a size that does not
split over the TP ranks gets."""

import pytest
import torch

from vllm.config import VllmConfig
from vllm.model_executor.parallel_context import ParallelContext


def test_outside_a_worker_the_factory_builds_the_whole_model(monkeypatch):
    # as in a reference run: no vLLM process groups (an in-process engine
    # started earlier in this process would have left them)
    monkeypatch.setattr(
        "vllm.distributed.parallel_state.model_parallel_is_initialized",
        lambda: False,
    )
    context = ParallelContext.from_vllm_config(VllmConfig())
    assert (context.tp_rank, context.tp_size, context.pp_rank, context.pp_size) == (
        0,
        1,
        0,
        1,
    )
    assert context.tp_group is None and context.pp_group is None
    assert context.is_first_pp_rank and context.is_last_pp_rank
    assert isinstance(context.device, torch.device)
    assert context.shard_size(12, "num_heads") == 12


def test_shard_size_splits_evenly_or_names_the_fix():
    context = ParallelContext(tp_rank=1, tp_size=4)
    assert context.shard_size(32, "num_heads") == 8
    with pytest.raises(ValueError) as error:
        context.shard_size(6, "num_kv_heads")
    assert str(error.value) == (
        "num_kv_heads (6) is not divisible by tensor_parallel_size (4); "
        "choose a tensor_parallel_size that divides 6."
    )


def test_pipeline_stage_flags():
    stages = [ParallelContext(pp_rank=rank, pp_size=3) for rank in range(3)]
    assert [s.is_first_pp_rank for s in stages] == [True, False, False]
    assert [s.is_last_pp_rank for s in stages] == [False, False, True]
