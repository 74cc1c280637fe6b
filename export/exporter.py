"""``ServableModel`` -> ``onnx.ModelProto`` with ai.kanmoe spline nodes and their bodies.

Route (see ``notes/onnx_custom_op_facts.md``): inside ``kanmoe.model.splines.export_mode()``
the layers call ``torch.ops.kanmoe.*``; ``torch.onnx.export(dynamo=True)`` maps each call to
one ``ai.kanmoe`` node via :func:`kanmoe.export.onnx_ops.translation_table`; the exporter
drops functions, so the FunctionProto bodies are attached to the returned proto afterwards.

Graph contract: input ``input`` float32 ``[batch, n_features]`` (``[batch, seq, n_features]``
for sequence models), outputs ``output`` ``[batch, n_targets]``, one gate output per MoE
layer (``gate_weights`` for a single layer, else ``gate_weights_<layer>``) and, unless
exported with ``explain=False``, each MoE layer's per-expert outputs ``[batch, n_experts,
out]`` (``expert_outputs`` / ``expert_outputs_<layer>``; raw target units for the final
layer). A client that does not fetch them pays for nothing but the graph's final Transpose.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from typing import Any

import onnx

from kanmoe.errors import ExportError
from kanmoe.export import onnx_ops
from kanmoe.export.graph_passes import merge_shared_lookups

INPUT_NAME = "input"
OUTPUT_NAME = "output"
GATE_PREFIX = "gate_weights"


EXPERT_PREFIX = "expert_outputs"


def gate_output_names(layers: list[str], prefix: str = GATE_PREFIX) -> dict[str, str]:
    """Map MoE layer name -> ONNX output name (``prefix`` alone when there is one layer)."""
    if len(layers) == 1:
        return {layers[0]: prefix}
    names: dict[str, str] = {}
    for layer in layers:
        name = f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', layer)}"
        if name in names.values():
            raise ExportError(f"two MoE layers map to the same output name {name!r}")
        names[layer] = name
    return names


def explain_info(servable: Any, expert_outputs: Mapping[str, str]) -> dict[str, Any] | None:
    """How a server splits a prediction into per-expert contributions, or None if it can't.

    ``prediction = offset + sum_e gate_e * (expert_e - offset)`` holds exactly when the
    final MoE layer's experts are mapped to raw target units linearly (see
    ``ServableModel.explain_offset``).
    """
    from kanmoe.model.run import final_moe_name

    layer = final_moe_name(servable.model)
    offset = servable.explain_offset()
    if layer is None or offset is None or layer not in expert_outputs:
        return None
    return {"layer": layer, "output": expert_outputs[layer], "offset": offset}


def metadata_of(
    servable: Any,
    gate_outputs: Mapping[str, str],
    expert_outputs: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``metadata_props`` written into the model (all values are strings; JSON if nested)."""
    from kanmoe import __version__

    expert_outputs = dict(expert_outputs or {})
    extra = {}
    if expert_outputs:
        extra = {
            "expert_outputs": json.dumps(expert_outputs),
            "explain": json.dumps(explain_info(servable, expert_outputs)),
        }
    return {
        "feature_names": json.dumps(list(servable.feature_names)),
        "target_names": json.dumps(list(servable.target_names)),
        "expert_names": json.dumps({k: list(v) for k, v in servable.expert_names.items()}),
        "gate_outputs": json.dumps(dict(gate_outputs)),
        "kanmoe_version": __version__,
        "metrics": json.dumps(servable.metrics, default=float),
        "config_hash": str(servable.config_hash),
        "is_sequence": json.dumps(bool(servable.is_sequence)),
        "seq_len": json.dumps(servable.seq_len),
        **extra,
    }


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """Inverse of :func:`metadata_of`: JSON values decoded, version and hash left as strings."""
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        if prop.key in ("kanmoe_version", "config_hash"):
            out[prop.key] = prop.value
        else:
            out[prop.key] = json.loads(prop.value)
    return out


def _example_input(servable: Any, batch: int = 2):
    import torch

    gen = torch.Generator().manual_seed(0)
    if servable.is_sequence:
        shape = (batch, int(servable.seq_len), servable.n_features)
    else:
        shape = (batch, servable.n_features)
    return torch.randn(*shape, generator=gen) * servable.x_std + servable.x_mean


def _torch_export(wrapper, example, output_names: list[str], dynamic_seq: bool):
    import torch
    from torch.export import Dim

    dims = {0: Dim("batch")}
    if dynamic_seq:
        dims[1] = Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            custom_translation_table=onnx_ops.translation_table(),
            dynamic_shapes=(dims,),
            input_names=[INPUT_NAME],
            output_names=output_names,
            verbose=False,
        )
    return prog.model_proto  # a new copy on every access: keep and edit this one


def export_model(servable: Any, layout: str = "cardinal", explain: bool = True) -> onnx.ModelProto:
    """Export a ``ServableModel`` to a self-contained ``onnx.ModelProto`` (IR 10, opset 20).

    Sequence models get a dynamic ``seq`` axis when the network allows it, else the
    training window length. ``explain`` adds the per-expert outputs of every MoE layer.
    Raises :class:`ExportError` if the exporter fails or the result misses a function body.
    """
    import torch

    from kanmoe.model.splines import export_mode

    servable = servable.eval()
    example = _example_input(servable)
    with torch.no_grad():
        _, gates = servable(example)
    layers = list(gates)
    gate_outputs = gate_output_names(layers)
    expert_outputs = gate_output_names(layers, EXPERT_PREFIX) if explain and layers else {}
    output_names = [OUTPUT_NAME, *gate_outputs.values(), *expert_outputs.values()]

    class _Flat(torch.nn.Module):
        """Tuple outputs in a fixed order: (y, gates by layer, [expert outputs by layer])."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            if not expert_outputs:
                y, g = self.inner(x)
                return (y, *(g[name] for name in layers))
            y, g, e = self.inner.forward_explained(x)
            return (y, *(g[name] for name in layers), *(e[name] for name in layers))

    wrapper = _Flat(servable).eval()
    errors = []
    for dynamic_seq in (True, False) if servable.is_sequence else (False,):
        try:
            with export_mode(), torch.no_grad():
                model = _torch_export(wrapper, example, output_names, dynamic_seq)
            break
        except Exception as exc:  # torch raises many types; report them as one
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    else:
        raise ExportError(f"torch.onnx.export failed: {'; '.join(errors)}")
    finish_model(model, metadata_of(servable, gate_outputs, expert_outputs), layout=layout)
    return model


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def drop_stack_traces(graph: onnx.GraphProto) -> None:
    """Remove the exporter's per-node Python stack traces (in place, subgraphs too).

    They name source files and line numbers of the machine that exported, so any edit to
    kanmoe's source changed the bytes of an otherwise identical model.
    """
    for node in graph.node:
        keep = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
        for attr in node.attribute:
            if attr.HasField("g"):
                drop_stack_traces(attr.g)
            for sub in attr.graphs:
                drop_stack_traces(sub)


def finish_model(
    model: onnx.ModelProto, metadata: Mapping[str, str], layout: str = "cardinal"
) -> onnx.ModelProto:
    """Merge shared lookups, attach function bodies, pin IR, set metadata, check (in place)."""
    merge_shared_lookups(model)
    onnx_ops.attach_functions(model, layout=layout)
    drop_stack_traces(model.graph)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, dict(metadata))
    model.producer_name = "kanmoe"
    if not onnx_ops.kanmoe_nodes(model):
        warnings.warn("exported graph has no ai.kanmoe nodes (no spline layers?)", stacklevel=2)
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx_ops.check_functions(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ExportError(f"exported model is invalid: {exc}") from exc
    names = [i.name for i in model.graph.input]
    if names != [INPUT_NAME]:
        raise ExportError(f"exported graph inputs are {names}, expected [{INPUT_NAME!r}]")
    return model
