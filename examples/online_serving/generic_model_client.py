# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Query a generic model served by `vllm serve` with the OpenAI client.

A checkpoint directory that names its factory is all `vllm serve` needs:

    my-model/
      config.json          {"architectures": ["MyModel"],
                            "vllm_model_factory": "my_model:build", ...}
      my_model.py          def build(vllm_config, parallel_context) -> nn.Module
      model.safetensors    weights under the module's parameter names
      tokenizer.json, tokenizer_config.json   (with a chat_template for chat)

    vllm serve my-model --trust-remote-code --served-model-name my-model \\
        [--tensor-parallel-size 2] [--pipeline-parallel-size 2]
    python examples/online_serving/generic_model_client.py --model my-model

(`my_model` may also be an installed package; `--trust-remote-code`
is required because the server imports the module the directory names.)
"""

import argparse

from openai import OpenAI


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:8000/v1")
    parser.add_argument("--model", default="my-model")
    parser.add_argument("--prompt", default="TorchTitan trains")
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="EMPTY")

    print("models:", [model.id for model in client.models.list().data])

    completion = client.completions.create(
        model=args.model, prompt=args.prompt, max_tokens=16, temperature=0.0
    )
    print(f"completion: {args.prompt!r} -> {completion.choices[0].text!r}")

    print("streamed:   ", end="")
    for chunk in client.completions.create(
        model=args.model,
        prompt=args.prompt,
        max_tokens=16,
        temperature=0.0,
        stream=True,
    ):
        print(chunk.choices[0].text, end="", flush=True)
    print()

    chat = client.chat.completions.create(
        model=args.model,
        max_tokens=16,
        temperature=0.0,
        messages=[{"role": "user", "content": args.prompt}],
    )
    print(f"chat: {chat.choices[0].message.content!r}")


if __name__ == "__main__":
    main()
