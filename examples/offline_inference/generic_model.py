# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Train a model written in plain PyTorch, then generate with it in vLLM.

The model below is ordinary training code (nanoGPT-sized). It uses
`TrainableFlashAttention`, so the same module trains on packed sequences
and, inside vLLM, runs on vLLM's paged KV cache. It is registered with a
lambda under `if __name__ == "__main__":`; the registration reaches vLLM's
spawn-started engine and worker processes. At the end the trainer's own
greedy decoding checks what vLLM generated.

    python examples/offline_inference/generic_model.py \
        [--tensor-parallel-size 2] [--enforce-eager] [--verbose]
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# vLLM logs its start-up at INFO and platform notices at WARNING; keep the
# demo's output to its result unless --verbose (or VLLM_LOGGING_LEVEL) asks
# for them. Set before vLLM is imported, which configures its logging; its
# processes inherit it.
VERBOSE = "--verbose" in sys.argv
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if VERBOSE else "ERROR")
if not VERBOSE:  # deprecation notices from inside vLLM and torch
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from vllm import LLM, ModelRegistry, SamplingParams  # noqa: E402
from vllm.model_executor.layers.trainable_attention import (  # noqa: E402
    TrainableFlashAttention,
)

TEXT = (
    "vLLM runs the model you trained. One definition serves the trainer "
    "and the engine, so the numbers agree and the weights move freely. "
)


def rotary(x, positions, theta=10000.0):
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, device=x.device) / half)
    angles = positions[:, None].float() * freqs
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


class Block(nn.Module):
    def __init__(self, dim, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, dim, bias=False)
        self.attn = TrainableFlashAttention(heads, head_dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        )

    def forward(self, x, positions, cu_seqlens=None):
        q, k, v = (
            self.qkv(self.norm1(x)).view(-1, 3, self.heads, self.head_dim).unbind(1)
        )
        q, k = rotary(q, positions), rotary(k, positions)
        x = x + self.proj(self.attn(q, k, v, cu_seqlens).flatten(1))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    """Tokens in, hidden states out; `compute_logits` maps them to logits."""

    def __init__(self, vocab_size, dim=128, layers=2, heads=2, head_dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, head_dim) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, input_ids, positions, cu_seqlens=None):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, positions, cu_seqlens)
        return self.norm(x)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def build_tokenizer(path: Path):
    """A byte-level BPE tokenizer made here (no model hub)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        [TEXT] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<eos>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"})
    )
    return tokenizer


def train(model, token_ids, steps=150) -> tuple[float, float]:
    """Next-token training on packed windows of the text; returns the loss
    before and after."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    window, batch = 32, 8
    data = torch.tensor(token_ids)
    losses = []
    progress = tqdm(range(steps), desc="training", unit="step", mininterval=0.5)
    for _ in progress:
        starts = torch.randint(0, len(data) - window - 1, (batch,))
        inputs = torch.cat([data[s : s + window] for s in starts])
        targets = torch.cat([data[s + 1 : s + window + 1] for s in starts])
        positions = torch.arange(window).repeat(batch)
        cu_seqlens = torch.arange(0, (batch + 1) * window, window, dtype=torch.int32)
        logits = model.compute_logits(model(inputs, positions, cu_seqlens))
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses[0], losses[-1]


@torch.no_grad()
def greedy_decode(model, prompt_ids, max_tokens, eos_token_id):
    """The trainer's greedy decoding: the whole sequence through the
    training forward at every step, no KV cache."""
    tokens = list(prompt_ids)
    for _ in range(max_tokens):
        ids = torch.tensor(tokens)
        hidden = model(ids, torch.arange(len(tokens)))
        tokens.append(int(model.compute_logits(hidden[-1:]).argmax()))
        if tokens[-1] == eos_token_id:
            break
    return tokens[len(prompt_ids) :]


def save_checkpoint(model, path: Path, vocab_size):
    config = {
        "architectures": ["TinyGPT"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_embd": 128,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 256,
        "torch_dtype": "float32",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }  # "<eos>"
    (path / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(path / "model.safetensors"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
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
    parser.add_argument("--verbose", action="store_true", help="show vLLM's INFO logs")
    args = parser.parse_args()
    if args.tensor_parallel_size > 1 and not torch.cuda.is_available():
        # vLLM's CPU workers each need their own cores
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND",
            "|".join(map(str, range(args.tensor_parallel_size))),
        )
    torch.manual_seed(0)
    checkpoint = Path(tempfile.mkdtemp(prefix="tinygpt-"))

    tokenizer = build_tokenizer(checkpoint)
    vocab_size = tokenizer.get_vocab_size()
    model = TinyGPT(vocab_size)
    loss_before, loss_after = train(model, tokenizer.encode(TEXT * 20).ids)
    model.eval()
    save_checkpoint(model, checkpoint, vocab_size)

    # The factory receives (vllm_config, parallel_context); this model is
    # small and unsharded, so it only needs the vocabulary size.
    ModelRegistry.register_model(
        "TinyGPT",
        lambda vllm_config, parallel_context: TinyGPT(
            vllm_config.model_config.hf_config.vocab_size
        ),
    )

    print("starting vLLM ...", flush=True)
    llm = LLM(
        model=str(checkpoint),
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.3,
        # on the CPU a fraction of host memory per rank would be gigabytes
        kv_cache_memory_bytes=None if torch.cuda.is_available() else 256 << 20,
        tensor_parallel_size=args.tensor_parallel_size,
        enforce_eager=args.enforce_eager,
        compilation_config=args.compilation_config,
        use_tqdm_on_load=VERBOSE,
    )
    prompts = ["vLLM runs the", "One definition serves", "the weights"]
    outputs = llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24), use_tqdm=False
    )

    eos_token_id = tokenizer.token_to_id("<eos>")
    same = [
        list(o.outputs[0].token_ids)
        == greedy_decode(model, o.prompt_token_ids, 24, eos_token_id)
        for o in outputs
    ]
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"\nTrained TinyGPT ({parameters / 1e6:.2f}M parameters, plain "
        f"PyTorch + TrainableFlashAttention) for 150 steps on one "
        f"sentence:\n  loss {loss_before:.3f} -> {loss_after:.3f}"
    )
    print(f"vLLM (tensor_parallel_size={args.tensor_parallel_size}) generated, greedy:")
    for output, match in zip(outputs, same):
        print(
            f"  {output.prompt!r} -> {output.outputs[0].text!r}"
            f"{'' if match else '   (differs from the trainer)'}"
        )
    print(
        f"Same tokens as the trainer's own greedy decoding: "
        f"{sum(same)}/{len(same)} prompts"
    )
    if not all(same):
        sys.exit(1)


if __name__ == "__main__":
    main()
