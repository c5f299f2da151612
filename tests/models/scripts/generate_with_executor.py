# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Registers a closure in `__main__` (nowhere else can it come from) and
prints the greedy token ids vLLM generates with the given executor, and
whether the model ran in a Ray actor.

    python generate_with_executor.py MODEL_DIR PROMPTS_JSON MAX_TOKENS \\
        {mp,ray} DTYPE
"""

import json
import sys

from vllm import LLM, ModelRegistry, SamplingParams

if __name__ == "__main__":
    model_dir, prompts, max_tokens, backend, dtype = (
        sys.argv[1],
        json.loads(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        sys.argv[5],
    )
    from tests.entrypoints.test_ray_executor import running_in_ray_actor
    from tests.models.tiny_decoder import build_tiny_decoder

    ModelRegistry.register_model(
        "TinyFromMain",
        lambda vllm_config, parallel_context: build_tiny_decoder(
            vllm_config, parallel_context
        ),
    )
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype=dtype,
        hf_overrides={"architectures": ["TinyFromMain"]},
        distributed_executor_backend=backend,
        enforce_eager=True,
        gpu_memory_utilization=0.2,
        max_model_len=512,
        seed=0,
    )
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        ),
        use_tqdm=False,
    )
    print("RAY_ACTOR " + json.dumps(llm.apply_model(running_in_ray_actor)))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
