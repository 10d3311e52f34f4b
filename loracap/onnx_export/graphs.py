"""What every export needs: a traced graph written to a file, two decoders merged into one, quantization.

Graphs are traced by torch.onnx's exporter (torch.export, `dynamo=True`) with named dynamic dimensions,
so one graph takes any batch, sequence and cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

QUANTIZATIONS = {"int8": "_quantized", "fp16": "_fp16"}
"""--quantize value -> the file-name suffix transformers.js uses for it."""

_MAX = 65536


def dim(name: str) -> Any:
    """A named dynamic dimension (1 to 65536)."""
    import torch

    return torch.export.Dim(name, min=1, max=_MAX)


def as_module(owner: Any, function: Any) -> Any:
    """`function(owner, tensor[, other])` as a module holding `owner`'s weights: what torch.onnx.export
    traces, for a part of a model that is no module of its own (an encoder's output, a fused prefix)."""
    import torch

    class Call(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.owner = owner

        def forward(self, tensor: torch.Tensor, other: torch.Tensor | None = None) -> Any:
            return function(self.owner, tensor) if other is None else function(self.owner, tensor, other)

    return Call()


def export_graph(
    module: Any,
    args: tuple,
    path: Path,
    *,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic_shapes: Any,
    opset: int,
) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(
            module, args, str(path), input_names=list(inputs), output_names=list(outputs),
            dynamic_shapes=dynamic_shapes, dynamo=True, external_data=False, opset_version=opset,
        )  # fmt: skip


def merge_decoders(no_past: Path, with_past: Path, out: Path) -> None:
    """One graph from a decoder's first step and its later steps, as optimum merges them: an `If` on a
    `use_cache_branch` input runs `with_past` when true and `no_past` otherwise; the inputs are both
    graphs' inputs (the first step gets empty caches and ignores them). Weights that both graphs hold
    under one name with equal bytes are stored once, outside the branches; what differs stays in its own
    branch. (optimum's own merge_decoders needs transformers < 4.58.)"""
    import onnx
    from onnx import helper

    first, later = onnx.load(str(no_past)), onnx.load(str(with_past))
    if [o.name for o in first.graph.output] != [o.name for o in later.graph.output]:
        raise ValueError("the two decoder graphs have different outputs and cannot be merged")
    later_weights = {w.name: w for w in later.graph.initializer}
    shared = [
        w
        for w in first.graph.initializer
        if w.name in later_weights and later_weights[w.name].SerializeToString() == w.SerializeToString()
    ]
    shared_names = {w.name for w in shared}

    def branch(model: Any, name: str) -> Any:
        own = [w for w in model.graph.initializer if w.name not in shared_names]
        return helper.make_graph(in_order(model.graph), name, [], list(model.graph.output), own)

    inputs = list(later.graph.input)
    names = {i.name for i in inputs}
    inputs += [i for i in first.graph.input if i.name not in names]
    switch = helper.make_tensor_value_info("use_cache_branch", onnx.TensorProto.BOOL, [1])
    node = helper.make_node(
        "If",
        ["use_cache_branch"],
        [o.name for o in first.graph.output],
        name="use_cache_branch_if",
        then_branch=branch(later, "with_past"),
        else_branch=branch(first, "no_past"),
    )
    graph = helper.make_graph([node], "merged", [*inputs, switch], list(first.graph.output), shared)
    opsets = {o.domain: o for o in [*first.opset_import, *later.opset_import]}
    merged = helper.make_model(graph, opset_imports=list(opsets.values()), ir_version=first.ir_version)
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out))


def in_order(graph: Any) -> list[Any]:
    """`graph`'s nodes in an order where each comes after the nodes it reads from (onnx's checker wants
    that inside an If's branches; the fp16 converter appends its input casts at the end)."""
    known = {i.name for i in graph.input} | {w.name for w in graph.initializer} | {""}
    waiting, ordered = list(graph.node), []
    while waiting:
        ready = [n for n in waiting if all(name in known for name in n.input)]
        if not ready:  # what is left reads names from outside (none here): keep their order
            return ordered + waiting
        for node in ready:
            known.update(node.output)
        ordered += ready
        waiting = [n for n in waiting if all(n is not r for r in ready)]
    return ordered


def quantize(source: Path, out: Path, kind: str) -> None:
    """`source` as int8 (dynamic quantization of MatMul/Gemm weights, activations quantized at run time)
    or fp16 (weights and arithmetic; inputs and outputs stay float32, so callers feed the same arrays)."""
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(source), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8)  # fmt: skip
    elif kind == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(half, str(out))
    else:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, not {kind!r}")
