# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Run by `deepspeed --num_gpus 2` (CPU ranks, gloo/shm): train a tiny
Llama for two steps under ZeRO stages 1, 2 and 3, saving after each step
with DeepSpeed's own `save_checkpoint` (`latest` names the second), beside
the full weights the trained module holds at the end
(`reference.safetensors`) and its `config.json`.

    deepspeed --num_gpus 2 tests/model_executor/deepspeed_zero_train.py OUT_DIR
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=1,
    num_key_value_heads=1,
    head_dim=64,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def main():
    out = sys.argv[-1]
    for stage in (1, 2, 3):
        torch.manual_seed(0)
        model = LlamaForCausalLM(CONFIG)
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=model.parameters(),
            config={
                "train_batch_size": 2,
                "train_micro_batch_size_per_gpu": 1,
                "optimizer": {
                    "type": "Adam",
                    "params": {"lr": 1e-2, "torch_adam": True},
                },
                "zero_optimization": {"stage": stage},
            },
        )
        run = os.path.join(out, f"zero{stage}")
        for step in range(2):  # saved after each: global_step1, global_step2
            ids = torch.randint(
                0,
                CONFIG.vocab_size,
                (1, 16),
                generator=torch.Generator().manual_seed(step),
            )
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            engine.save_checkpoint(run)
            if engine.global_rank == 0:
                print(
                    f"zero{stage}: step {step + 1} saved, loss {loss.item():.3f}",
                    flush=True,
                )
        with deepspeed.zero.GatheredParameters(
            list(model.parameters()), enabled=stage == 3
        ):
            state = {name: p.detach().clone() for name, p in model.named_parameters()}
        if engine.global_rank == 0:
            model.config.save_pretrained(run)
            save_file(state, os.path.join(run, "reference.safetensors"))
        engine.destroy()
    # Tear gloo down before the interpreter does: a process group left to
    # exit-time destructors can abort the rank (SIGABRT, "terminate called
    # without an active exception") after every checkpoint is written.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
