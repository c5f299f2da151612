# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Registers "script_dir_factories:build" (a module that only this script's
directory holds) and prints the greedy token ids vLLM generates, as JSON.

    python generate_from_script_dir.py MODEL_DIR PROMPTS_JSON MAX_TOKENS
"""

import json
import sys

from vllm import LLM, ModelRegistry, SamplingParams

if __name__ == "__main__":
    model_dir, prompts, max_tokens = (
        sys.argv[1],
        json.loads(sys.argv[2]),
        int(sys.argv[3]),
    )
    ModelRegistry.register_model("TinyFromScriptDir", "script_dir_factories:build")
    llm = LLM(
        model=model_dir,
        skip_tokenizer_init=True,
        dtype="float32",
        hf_overrides={"architectures": ["TinyFromScriptDir"]},
        gpu_memory_utilization=0.1,
        max_model_len=512,
        seed=0,
        enforce_eager=True,
        distributed_executor_backend="mp",  # a spawned worker, also at TP=1
    )
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False
        ),
        use_tqdm=False,
    )
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]))
