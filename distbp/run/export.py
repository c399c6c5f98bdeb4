"""model.npz -> ONNX, for ONNX Runtime, Triton, browsers and anything else that serves ONNX.

The graph takes one input `X` (rows, features) in the model's dtype (float or double) and does
what `Model.predict_proba` / `Model.predict` do, in the same order:
- X - x_mean, then / x_std, with both cast to the model's dtype first (the workers' path);
- per layer, MatMul by W_l, Add b_l, then the layer's activation;
- classification: `probabilities` (rows, classes), a plain tensor (no ZipMap), softmax or
  [1 - p, p] for a sigmoid output, and `label` (rows,), the class of the largest probability
  (the first on a tie), as the model's classes: int64 or strings;
- regression: `predictions` (rows, targets).

Uses the `onnx` package (the `onnx` extra); opset 17, IR version 8, so any ONNX Runtime from
1.14 on runs it.
"""

import os

import numpy as np

from distbp.backprop.activations import ACTIVATIONS
from distbp.backprop.nn import views
from distbp.errors import UsageError
from distbp.run.checkpoint import atomic_write
from distbp.run.model import load_model

OPSET = 17
IR_VERSION = 8
_ACTIVATIONS = {"sigmoid": ("Sigmoid", {}), "tanh": ("Tanh", {}), "relu": ("Relu", {}), "identity": ("Identity", {})}


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UsageError("exporting to ONNX needs the onnx package", hint="pip install 'distbp[onnx]'") from None
    return onnx


def to_onnx(model):
    """The ModelProto of a distbp Model (see the module docstring)."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    spec, dtype = model.spec, model.spec.np_dtype
    elem = TensorProto.FLOAT if dtype == np.float32 else TensorProto.DOUBLE
    nodes, inits = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    x = "X"
    if model.x_mean is not None:
        nodes.append(helper.make_node("Sub", [x, const("x_mean", model.x_mean.astype(dtype))], ["x_centred"]))
        nodes.append(helper.make_node("Div", ["x_centred", const("x_std", model.x_std.astype(dtype))], ["x_standardized"]))
        x = "x_standardized"
    layers = views(spec, np.asarray(model.params, dtype))
    names = [*spec.activations, spec.output]
    for l, ((W, b), act) in enumerate(zip(layers, names), start=1):
        nodes.append(helper.make_node("MatMul", [x, const(f"W{l}", W)], [f"xw{l}"]))
        nodes.append(helper.make_node("Add", [f"xw{l}", const(f"b{l}", b)], [f"z{l}"]))
        if l == len(layers):
            x = f"z{l}"
            break
        if act == "leaky_relu":  # max(z, alpha z): ONNX's LeakyRelu holds alpha as a float32 attribute
            alpha = const(f"alpha{l}", np.asarray(ACTIVATIONS[act].alpha, dtype))
            nodes.append(helper.make_node("Mul", [f"z{l}", alpha], [f"az{l}"]))
            nodes.append(helper.make_node("Max", [f"z{l}", f"az{l}"], [f"a{l}"]))
        else:
            op, attrs = _ACTIVATIONS[act]
            nodes.append(helper.make_node(op, [f"z{l}"], [f"a{l}"], **attrs))
        x = f"a{l}"

    rows = "rows"
    if model.task == "regression":
        nodes.append(helper.make_node("Identity", [x], ["predictions"]))
        outputs = [helper.make_tensor_value_info("predictions", elem, [rows, spec.layers[-1]])]
    else:
        if spec.output == "softmax":
            nodes.append(helper.make_node("Softmax", [x], ["probabilities"], axis=1))
        else:  # one sigmoid unit holds P(class 1): [1 - p, p], as predict_proba
            nodes.append(helper.make_node("Sigmoid", [x], ["p1"]))
            nodes.append(helper.make_node("Sub", [const("one", np.ones(1, dtype)), "p1"], ["p0"]))
            nodes.append(helper.make_node("Concat", ["p0", "p1"], ["probabilities"], axis=1))
        nodes.append(helper.make_node("ArgMax", ["probabilities"], ["index"], axis=1, keepdims=0, select_last_index=0))
        strings = isinstance(model.classes[0], str)
        classes = np.array(model.classes, dtype=object if strings else np.int64)
        if strings:
            inits.append(helper.make_tensor("classes", TensorProto.STRING, [len(classes)], [c.encode() for c in classes]))
        else:
            const("classes", classes)
        nodes.append(helper.make_node("Gather", ["classes", "index"], ["label"], axis=0))
        outputs = [
            helper.make_tensor_value_info("label", TensorProto.STRING if strings else TensorProto.INT64, [rows]),
            helper.make_tensor_value_info("probabilities", elem, [rows, len(model.classes)]),
        ]
    graph = helper.make_graph(nodes, "distbp", [helper.make_tensor_value_info("X", elem, [rows, spec.layers[0]])], outputs, inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="distbp")
    proto.ir_version = IR_VERSION
    proto.doc_string = f"distbp {model.task} model; features: {', '.join(model.features)}"
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export(model_path, out_path):
    """Write the ONNX file of a model.npz (atomically); returns the Model."""
    model = load_model(model_path)
    if not str(out_path).endswith(".onnx"):
        raise UsageError(f"-o {out_path}: expected a file name ending in .onnx")
    folder = os.path.dirname(os.path.abspath(out_path))
    if os.path.isdir(out_path) or not os.path.isdir(folder):
        raise UsageError(f"-o {out_path}: cannot write a file there", hint="give a file name in an existing folder")
    blob = to_onnx(model).SerializeToString()
    atomic_write(out_path, lambda f: f.write(blob))
    return model
