# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""RL post-training with one model definition for the trainer and vLLM.

The policy below is plain PyTorch with `TrainableFlashAttention`. vLLM
samples every batch from it; the trainer recomputes the sampled tokens'
log-probabilities with the same module (packed sequences, the attention's
training path), takes a GRPO step, and pushes the new weights into the
running engine. The task has a programmatic reward: after a digit `d`,
continue counting (`d+1, d+2, ...` mod 10); each sampled token that does
earns 1, and a completion's reward is the fraction of its tokens that do.
Advantages are normalised within each prompt's group of samples and each
token is credited with the rewards from it to the end of its completion.

    python examples/offline_inference/rl_one_definition.py [--steps 120]
    python examples/offline_inference/rl_one_definition.py --device cuda \
        --dtype bfloat16 [--trainer-dtype float32]

`--dtype` is the engine's; `--trainer-dtype` (default: the same) keeps the
trainer's weights and optimiser state in another dtype, with its forward
under autocast to the engine's dtype: fp32 master weights, as mixed
precision training keeps them, so small AdamW steps are not rounded away.

Each step prints the reward, the time the weight push took, the largest
difference between vLLM's and the trainer's log-probabilities of the
sampled tokens, how many of them differ at all, and vLLM's sampling
throughput. `--exact` (CUDA) runs both sides in the exact configuration
(vllm.model_executor.layers.exact_logprobs), where none differ: the
engine's model and the trainer's compiled by Inductor with the same
options, as fast as vLLM's default configuration at real sizes (see the
docs' "Exact log-probabilities"); `--exact graphs` compiles neither (CUDA
graphs for decode steps only):

    python examples/offline_inference/rl_one_definition.py --device cuda \
        --dtype bfloat16 --exact

On an H200 (bf16, 54 steps): 0 of 27,648 log-probabilities differ either
way, 3.5 steps/s with Inductor.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Keep vLLM's start-up logs out of the loop's output unless --verbose.
VERBOSE = "--verbose" in sys.argv
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if VERBOSE else "ERROR")
if not VERBOSE:  # deprecation notices from inside vLLM and torch
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
# The weight push sends a callable to the workers (LLM.apply_model).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vllm import LLM, ModelRegistry, SamplingParams  # noqa: E402
from vllm.model_executor.layers import exact_logprobs  # noqa: E402
from vllm.model_executor.layers.trainable_attention import (  # noqa: E402
    TrainableFlashAttention,
    pack_sequences,
)
from vllm.model_executor.model_loader.engine_weights import (  # noqa: E402
    EngineWeights,
)
from vllm.model_executor.model_loader.shared_weights import (  # noqa: E402
    SharedWeights,
)

VOCAB = 16  # tokens 0-9 are digits; the others are never rewarded
COMPLETION_TOKENS = 4
CLIP = 0.2  # PPO's clipping of the importance ratio


class Block(nn.Module):
    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, dim, bias=False)
        self.attn = TrainableFlashAttention(heads, head_dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)
        )

    def forward(self, x, positions, cu_seqlens=None):
        q, k, v = (
            self.qkv(self.norm1(x)).view(-1, 3, self.heads, self.head_dim).unbind(1)
        )
        x = x + self.out(self.attn(q, k, v, cu_seqlens).flatten(1))
        return x + self.mlp(self.norm2(x))


class Policy(nn.Module):
    """A tiny decoder; learnt position embeddings (no rotary needed)."""

    def __init__(
        self,
        vocab_size=VOCAB,
        dim=128,
        layers=2,
        heads=2,
        head_dim=64,
        max_positions=64,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_positions, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, head_dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids, positions, cu_seqlens=None):
        x = self.embed(input_ids) + self.position(positions)
        for block in self.blocks:
            x = block(x, positions, cu_seqlens)
        return self.norm(x)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def build_policy(vllm_config, parallel_context):
    return Policy(vllm_config.model_config.hf_config.vocab_size)


def token_rewards(prompt: int, completion: list[int]) -> list[float]:
    """1 for each token that continues the count, else 0; a completion's
    reward is their mean."""
    return [
        float(token == (prompt + i) % 10) for i, token in enumerate(completion, start=1)
    ]


def advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO with per-token rewards (`[prompts, samples, tokens]`), as in
    DeepSeekMath's process supervision: normalise the rewards within each
    prompt's group of samples, and credit each token with the normalised
    rewards from it to the end of its completion."""
    mean = rewards.mean((1, 2), keepdim=True)
    std = rewards.std((1, 2), keepdim=True)
    normalised = (rewards - mean) / (std + 1e-4)
    return normalised.flip(-1).cumsum(-1).flip(-1)


def sequence_logprobs(policy, prompts, completions, exact) -> list[torch.Tensor]:
    """Log-probabilities of each completion's tokens under `policy`, all
    sequences packed into one varlen batch (the attention's training
    path); with `exact`, through the kernels the engine runs."""
    sequences = [[p] + c for p, c in zip(prompts, completions)]
    lengths = [len(s) for s in sequences]
    device = next(policy.parameters()).device
    tokens, positions, cu_seqlens = pack_sequences(sequences, device)
    hidden = policy(tokens, positions, cu_seqlens)
    if exact:
        with exact_logprobs.row_invariant_matmuls():
            logits = policy.compute_logits(hidden)
    else:
        logits = policy.compute_logits(hidden)
    # position i predicts token i + 1; each completion starts at 1
    rows, targets = [], []
    for start, length in zip(cu_seqlens[:-1].tolist(), lengths):
        rows.extend(range(start, start + length - 1))
        targets.extend(range(start + 1, start + length))
    if exact:
        logprobs = exact_logprobs.token_logprobs(logits[rows], tokens[targets])
    else:
        logprobs = F.log_softmax(logits[rows].float(), -1)
        logprobs = logprobs.gather(1, tokens[targets, None])[:, 0]
    return list(logprobs.split([length - 1 for length in lengths]))


def weight_push(llm: LLM, device: str, dtype: torch.dtype):
    """The push the docs recommend for this layout, as a function of the
    policy that returns the seconds it took, and what closes it. Either
    copies the trainer's weights into the running engine, cast to the
    engine's dtype, and resets the prefix cache.

    - CUDA (engine at TP=1 on this machine): the engine's parameters opened
      here once by CUDA IPC; a push is one batched device copy.
    - CPU: one shared-memory buffer laid out once, which the worker copies
      from after each optimiser step."""
    on_cuda = device.startswith("cuda")
    if on_cuda:
        copy, close = EngineWeights(llm).push, lambda: None
    else:
        shared = SharedWeights(Policy(), dtype=dtype)  # the layout
        copy, close = functools.partial(shared, llm), shared.close

    def push(policy) -> float:
        if on_cuda:  # the optimiser step's kernels: not the push's time
            torch.cuda.synchronize()
        start = time.perf_counter()
        copy(policy)
        return time.perf_counter() - start

    return push, close


def write_model_dir(policy: Policy, dtype: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="rl-policy-"))
    (path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["RLPolicy"],
                "model_type": "gpt2",
                "vocab_size": VOCAB,
                "n_embd": 128,
                "n_layer": 2,
                "n_head": 2,
                "n_positions": 64,
                "torch_dtype": dtype,
            }
        )
    )
    state = {k: v.cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(path / "model.safetensors"))
    return path


@dataclass
class Batch:
    """One step's samples: vLLM's completions of `prompts` and its
    log-probabilities of them, under the weights the engine held."""

    prompts: list[int]  # one per completion
    completions: list[list[int]]
    vllm_logprobs: list[torch.Tensor]
    rewards: torch.Tensor  # [prompts, samples, tokens]
    tokens_per_second: float


def sample(llm: LLM, step: int, args) -> Batch:
    """vLLM samples step's batch. Prompts and sampling seeds come from the
    step number alone: the run is reproducible, whatever thread samples
    and whatever order the engine schedules requests in."""
    generator = torch.Generator().manual_seed(step)
    prompts = torch.randint(0, 10, (args.prompts_per_step,), generator=generator)
    first_seed = step * args.prompts_per_step * args.samples_per_prompt
    start = time.perf_counter()
    outputs = llm.generate(
        [{"prompt_token_ids": [p]} for p in prompts.tolist()],
        [
            SamplingParams(
                n=args.samples_per_prompt,
                temperature=1.0,
                max_tokens=COMPLETION_TOKENS,
                ignore_eos=True,
                logprobs=0,
                detokenize=False,
                # a seed per request; its samples take seed, seed + 1, ...
                seed=first_seed + i * args.samples_per_prompt,
            )
            for i in range(args.prompts_per_step)
        ],
        use_tqdm=False,
    )
    seconds = time.perf_counter() - start
    flat_prompts, completions, logprobs, rewards = [], [], [], []
    for prompt, output in zip(prompts.tolist(), outputs):
        for completion in output.outputs:
            tokens = list(completion.token_ids)
            flat_prompts.append(prompt)
            completions.append(tokens)
            logprobs.append(
                torch.tensor(
                    [entry[t].logprob for entry, t in zip(completion.logprobs, tokens)]
                )
            )
            rewards.append(token_rewards(prompt, tokens))
    return Batch(
        flat_prompts,
        completions,
        logprobs,
        torch.tensor(rewards).view(args.prompts_per_step, args.samples_per_prompt, -1),
        tokens_per_second=sum(map(len, completions)) / seconds,
    )


def train_step(policy, optimizer, batch: Batch, autocast, exact) -> torch.Tensor:
    """One clipped policy-gradient step (PPO's objective with GRPO's
    advantages) on `batch`; the importance ratio is the trainer's
    probability of each sampled token over vLLM's. On-policy it is 1 (in
    the exact configuration exactly), one step off-policy it corrects for
    the weights the batch was sampled with. Returns |log ratio| of every
    token."""
    token_advantages = advantages(batch.rewards).flatten(0, 1)
    policy.train()
    with autocast:
        logprobs = sequence_logprobs(policy, batch.prompts, batch.completions, exact)
    loss, log_ratios = 0.0, []
    for advantage, ours, theirs in zip(token_advantages, logprobs, batch.vllm_logprobs):
        log_ratio = ours - theirs.to(ours)
        ratio = torch.exp(log_ratio)
        advantage = advantage.to(ours)
        clipped = torch.clamp(ratio, 1 - CLIP, 1 + CLIP) * advantage
        loss = loss - torch.minimum(ratio * advantage, clipped).sum()
        log_ratios.append(log_ratio.detach().abs().cpu())
    optimizer.zero_grad()
    (loss / len(logprobs)).backward()
    optimizer.step()
    return torch.cat(log_ratios)


def run_loop(llm, new_trainer, push, args, pipelined: bool) -> tuple[list[dict], float]:
    """GRPO from freshly initialised weights until the reward target or
    `--steps`. Synchronous: sample, train, push, in turn. Pipelined: vLLM
    samples the next batch (with the weights it holds) while the trainer
    trains on this one, so each batch is trained one step after the
    weights that sampled it; pushes land between two generate calls.
    Returns each step's record and the loop's steps/s."""
    policy, optimizer, autocast = new_trainer()
    push(policy)  # the engine starts from the trainer's initial weights
    name = "pipelined" if pipelined else "synchronous"
    history = []
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=1) as sampler:
        batch = sample(llm, 0, args)
        progress = tqdm(range(args.steps), desc=f"GRPO, {name}", unit="step")
        for step in progress:
            upcoming = (
                sampler.submit(sample, llm, step + 1, args) if pipelined else None
            )
            log_ratios = train_step(policy, optimizer, batch, autocast, args.exact)
            if upcoming is not None:
                upcoming = upcoming.result()  # the engine is idle from here
            push_seconds = push(policy)
            reward = batch.rewards.mean().item()
            history.append(
                dict(
                    reward=reward,
                    push=push_seconds,
                    diff=log_ratios.max().item(),
                    differing=int((log_ratios != 0).sum()),
                    tokens=len(log_ratios),
                )
            )
            progress.set_postfix(reward=f"{reward:.2f}", refresh=False)
            # on-policy the log ratio is the logprob difference vLLM vs trainer
            off_policy = pipelined and step > 0
            measure = "log ratio (1 step off-policy)" if off_policy else "logprob diff"
            tqdm.write(
                f"step {step:3d}  reward {reward:.3f}  sync "
                f"{push_seconds * 1e3:6.1f} ms  max |{measure}| "
                f"{history[-1]['diff']:.2e}  differing "
                f"{history[-1]['differing']}/{len(log_ratios)}  "
                f"{batch.tokens_per_second:.0f} tok/s"
            )
            if reward >= args.target_reward:
                break
            batch = upcoming if upcoming is not None else sample(llm, step + 1, args)
    seconds = time.perf_counter() - start
    print(
        f"{name}: {len(history)} steps in {seconds:.1f} s, "
        f"{len(history) / seconds:.2f} steps/s; reward "
        f"{history[0]['reward']:.3f} -> {history[-1]['reward']:.3f}"
    )
    return history, len(history) / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--prompts-per-step", type=int, default=16)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the engine's dtype",
    )
    parser.add_argument(
        "--trainer-dtype",
        choices=["float32", "bfloat16"],
        help="the trainer's weights (default: --dtype)",
    )
    parser.add_argument(
        "--target-reward",
        type=float,
        default=0.9,
        help="stop once the mean reward reaches this",
    )
    parser.add_argument(
        "--loop",
        choices=["synchronous", "pipelined", "both"],
        default="synchronous",
        help="pipelined: vLLM samples the next batch while the trainer trains "
        "(one step off-policy); both: one after the other on the same "
        "engine, with their steps/s side by side",
    )
    parser.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no torch.compile or CUDA graphs: faster start, slower steps",
    )
    parser.add_argument(
        "--compilation-config",
        type=json.loads,
        help="vLLM's compilation config as JSON, as `vllm serve -cc` takes it; "
        'e.g. \'{"backend": "eager"}\' traces the model without Inductor',
    )
    parser.add_argument(
        "--exact",
        nargs="?",
        const="inductor",
        choices=("inductor", "graphs"),
        help="CUDA: bitwise-equal log-probabilities in vLLM and the trainer "
        "(exact_engine_args, prepare_trainer), both sides compiled by "
        "Inductor; `--exact graphs`: neither compiled",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    trainer_dtype = getattr(torch, args.trainer_dtype or args.dtype)

    ModelRegistry.register_model("RLPolicy", build_policy)
    engine_args = dict(
        skip_tokenizer_init=True,
        dtype=args.dtype,
        seed=0,
        max_model_len=64,
        gpu_memory_utilization=0.2,
        # on the CPU a fraction of host memory would be gigabytes
        kv_cache_memory_bytes=None if args.device.startswith("cuda") else 256 << 20,
        enforce_eager=args.enforce_eager,
        compilation_config=args.compilation_config,
        use_tqdm_on_load=VERBOSE,
    )
    if args.exact:
        try:
            engine_args = exact_logprobs.exact_engine_args(
                device=args.device, inductor=args.exact == "inductor", **engine_args
            )
        except exact_logprobs.ExactLogprobsError as error:
            parser.error(f"--exact: {error}")
    torch.manual_seed(0)
    llm = LLM(model=str(write_model_dir(Policy(), args.dtype)), **engine_args)

    def new_trainer():
        torch.manual_seed(0)
        policy = Policy().to(args.device, trainer_dtype)
        if args.exact:
            exact_logprobs.prepare_trainer(policy, llm)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr)
        # the trainer computes in the engine's dtype, whatever its weights'
        autocast = torch.autocast(
            torch.device(args.device).type, dtype=dtype, enabled=trainer_dtype != dtype
        )
        return policy, optimizer, autocast

    push, close_push = weight_push(llm, args.device, dtype)
    loops = ["synchronous", "pipelined"] if args.loop == "both" else [args.loop]
    # loop -> (each step's record, steps/s)
    results = {
        loop: run_loop(llm, new_trainer, push, args, pipelined=loop == "pipelined")
        for loop in loops
    }
    close_push()

    trainer = f", trainer {args.trainer_dtype}" if trainer_dtype != dtype else ""
    print(
        f"\nGRPO on one model definition ({args.device}, {args.dtype}{trainer}), "
        f"{args.prompts_per_step} prompts x {args.samples_per_prompt} samples "
        "a step"
    )
    for loop, (history, steps_per_second) in results.items():
        pushes = sorted(record["push"] for record in history)
        on_policy = history if loop == "synchronous" else history[:1]
        print(
            f"  {loop}: {len(history)} steps, reward {history[0]['reward']:.3f} "
            f"-> {history[-1]['reward']:.3f} (chance about {1 / VOCAB:.3f}), "
            f"{steps_per_second:.2f} steps/s, weight push "
            f"median {pushes[len(pushes) // 2] * 1e3:.1f} ms"
        )
        print(
            f"    vLLM vs trainer log-probabilities of on-policy samples: max "
            f"|diff| {max(r['diff'] for r in on_policy):.2e}, differing "
            f"{sum(r['differing'] for r in on_policy)}/"
            f"{sum(r['tokens'] for r in on_policy)}"
        )
    if len(results) == 2:
        ratio = results["pipelined"][1] / results["synchronous"][1]
        print(f"  pipelined vs synchronous: {ratio:.2f}x the steps/s")


if __name__ == "__main__":
    main()
