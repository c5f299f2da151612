# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""A factory module that only the directory of the script next to it holds
(it is not a package of the repository)."""

from tests.models.tiny_decoder import build_tiny_decoder


def build(vllm_config, parallel_context):
    return build_tiny_decoder(vllm_config, parallel_context)
