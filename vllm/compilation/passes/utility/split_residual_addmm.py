# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Keep a residual add out of the GEMM before it.

A model written as `h = h + self.o_proj(x)` in bf16 gives Inductor
`add(mm(x, W), h)`, which its post-grad patterns fold into
`addmm(h, x, W)` whenever the sum leaves the graph (as the residual
stream does at every attention op vLLM splits the graph at). cuBLAS's
addmm then copies `h` into the output before the GEMM adds onto it: one
device-to-device copy per residual add, two per layer per step
(`memcpy32_post` under CUDA graphs), and a GEMM that reads its output.
vLLM's own models never meet this, since their RMSNorm adds the residual
in fp32 (`fused_add_rms_norm`).

This pass, run after Inductor's patterns, turns such an `addmm` back into
`mm` + `add`: the GEMM writes its product alone and Inductor fuses the add
into the kernel that consumes the sum (the next norm), as in vLLM's
models. It also restores eager's rounding (product rounded, then the sum)
where addmm rounded once. An `addmm` whose addend is a broadcast bias is
left alone: cuBLAS adds a bias in its epilogue without a copy.
"""

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from vllm.compilation.passes.inductor_pass import InductorPass

aten = torch.ops.aten


def _full_size_addend(node: fx.Node) -> bool:
    """Whether `node` (an addmm) adds a tensor of its own output's shape
    with alpha = beta = 1."""
    if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
        return False
    addend = node.args[0]
    if not isinstance(addend, fx.Node):
        return False
    addend_value, output_value = addend.meta.get("val"), node.meta.get("val")
    if not isinstance(addend_value, torch.Tensor) or output_value is None:
        return False
    return addend_value.dim() == 2 and all(
        statically_known_true(size == output_size)
        for size, output_size in zip(addend_value.shape, output_value.shape)
    )


class SplitResidualAddmmPass(InductorPass):
    """`addmm(residual, a, b)` -> `mm(a, b) + residual`, for full-size
    addends. Registered by `CallableModelWrapper` for generic models as
    Inductor's `post_grad_custom_post_pass`."""

    def __call__(self, graph: fx.Graph) -> None:
        addmms = graph.find_nodes(op="call_function", target=aten.addmm.default)
        for node in list(addmms):
            if not _full_size_addend(node):
                continue
            addend, mat1, mat2 = node.args[:3]
            with graph.inserting_before(node):
                product = graph.call_function(aten.mm.default, (mat1, mat2))
                total = graph.call_function(aten.add.Tensor, (product, addend))
            # both have the addmm's shape, dtype and (contiguous) strides
            product.meta["val"] = total.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(total)
            graph.erase_node(node)
