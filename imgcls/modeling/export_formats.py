"""Writing the serving graph in each export format with Keras' own export (`model.export`, and its
ExportArchive for the SavedModel), and turning a converter's refusal into one paragraph that names
the layer and the format.

    saved_model  a TensorFlow SavedModel whose `serving_default` signature TF Serving calls
    onnx         one model.onnx (tf2onnx), checked for operators ONNX does not define
    litert       one model.tflite of LiteRT built-in operators only: the `ai-edge-litert` interpreter
                 (and the TFLite runtimes on phones) cannot run TensorFlow "flex" operators
"""

from __future__ import annotations

import logging
import re
import warnings
from importlib import metadata as package_metadata
from pathlib import Path
from typing import TYPE_CHECKING

from imgcls.errors import ExportError, clip
from imgcls.platform.logs import native_chatter_filtered, native_output_held, verbose

if TYPE_CHECKING:  # importing keras starts TensorFlow, which require_export_extra must not need
    import keras

logger = logging.getLogger(__name__)

# The file each format's runtime opens (for saved_model, the folder holding it).
MODEL_FILES = {"saved_model": "saved_model.pb", "onnx": "model.onnx", "litert": "model.tflite"}
# Python modules of the export extra each format needs, for its conversion or its runtime check.
# The lightest first: tf2onnx starts TensorFlow.
EXTRA_MODULES = {"saved_model": (), "onnx": ("onnxruntime", "onnx", "tf2onnx"), "litert": ("ai_edge_litert",)}
# Distributions whose versions an export records, per format.
VERSIONED_PACKAGES = {
    "saved_model": ("keras", "tensorflow"),
    "onnx": ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime"),
    "litert": ("keras", "tensorflow", "ai-edge-litert"),
}
INSTALL_HINT = "pip install 'imgcls[export]'"
# How the TFLite converter names an operator it cannot express and where it sits in the graph, e.g.
# loc(callsite(fused["ScaleAndTranslate:", "serving_1/cnn_1/resize_1/resize/ScaleAndTranslate@__inference_..."]
# ... 'tf.ScaleAndTranslate' op is neither a custom op nor a flex op
_LITERT_REFUSED_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
_LITERT_OP_LOCATION = re.compile(r'fused\["(\w+):", "([^"@]+)@')


def require_export_extra(export_format: str) -> None:
    """Raise ExportError unless the packages `export_format` needs are importable."""
    import importlib

    for module in EXTRA_MODULES[export_format]:
        try:
            with native_chatter_filtered():  # tf2onnx starts TensorFlow
                importlib.import_module(module)
        except ImportError as error:
            raise ExportError(
                f"Exporting to {export_format} needs the export extra, and {module} cannot be imported "
                f"({clip(str(error), 160)}). Install it with `{INSTALL_HINT}` (tf2onnx, onnx, onnxruntime, "
                "ai-edge-litert, pinned to versions that work with imgcls's TensorFlow)."
            ) from None


def package_versions(export_format: str) -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES[export_format]:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def write_format(serving: keras.Model, export_format: str, directory: Path) -> dict[str, object]:
    """Write `serving` in `export_format` into the empty `directory`; returns what metadata.json records
    about the conversion beyond the package versions (the ONNX opset)."""
    writers = {"saved_model": _write_saved_model, "onnx": _write_onnx, "litert": _write_litert}
    return writers[export_format](serving, directory)


def _write_saved_model(serving: keras.Model, directory: Path) -> dict[str, object]:
    """Keras' ExportArchive with one endpoint, `serve`, which it also registers as the
    `serving_default` signature TF Serving calls. Not `model.export()`: that tracks the model too, and
    Keras 3.15 then stores every weight twice (the Keras variables and the tf.Variables the endpoint
    captured, keras-team/keras#23553): twice the size on disk and twice the memory in TF Serving. The
    endpoint's own variables, BatchNorm statistics included, are all a serving graph needs."""
    import keras
    import tensorflow as tf

    from imgcls.modeling.serving import INPUT_NAME

    image_shape = [None, *serving.inputs[0].shape[1:]]

    def serve(image):
        return serving(image, training=False)

    archive = keras.export.ExportArchive()
    archive.add_endpoint("serve", serve, input_signature=[tf.TensorSpec(image_shape, tf.float32, name=INPUT_NAME)])
    with native_output_held():
        archive.write_out(str(directory), verbose=False)
    return {"signature": "serving_default"}


def _write_onnx(serving: keras.Model, directory: Path) -> dict[str, object]:
    import onnx

    path = directory / MODEL_FILES["onnx"]
    tf2onnx_logger = logging.getLogger("tf2onnx")
    previous_level = tf2onnx_logger.level
    if not verbose():
        # tf2onnx logs each operator it cannot convert as an error and still writes the file: the check
        # below says it in one paragraph instead.
        tf2onnx_logger.setLevel(logging.CRITICAL)
    try:
        with native_output_held() as held, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                serving.export(str(path), format="onnx", verbose=False)
            except Exception as error:
                raise _unexportable("onnx", serving, f"{error}\n{''.join(held)}", error) from None
    finally:
        tf2onnx_logger.setLevel(previous_level)
    model = onnx.load(str(path))
    undefined = [node for node in model.graph.node if not onnx.defs.has(node.op_type, node.domain)]
    if undefined:
        node = undefined[0]
        layer = layer_for_node(serving, node.name)
        reason = f"tf2onnx has no ONNX operator for the TensorFlow op {node.op_type}"
        raise ExportError(_unexportable_message("onnx", layer, reason, [n.op_type for n in undefined]))
    # A readable name for the batch dimension instead of tf2onnx's `unk__35`.
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, str(path))
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    return {"opset": opsets.get("ai.onnx")}


def _write_litert(serving: keras.Model, directory: Path) -> dict[str, object]:
    import tensorflow as tf

    path = directory / MODEL_FILES["litert"]
    with native_output_held() as held:
        try:
            serving.export(
                str(path), format="litert", verbose=False,
                target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]},
            )  # fmt: skip
        except Exception as error:
            raise _unexportable("litert", serving, f"{error}\n{''.join(held)}", error) from None
    return {"signature": "serving_default", "operator_sets": ["TFLITE_BUILTINS"]}


def _unexportable(export_format: str, serving: keras.Model, text: str, error: Exception) -> ExportError:
    """The converter's failure as one paragraph: the first refused operator, mapped back to its layer."""
    refused = _LITERT_REFUSED_OP.findall(text)
    locations = dict(_LITERT_OP_LOCATION.findall(text))
    if refused:
        op = refused[0]
        layer = layer_for_node(serving, locations.get(op, ""))
        reason = f"the TensorFlow op {op} is not a LiteRT built-in operator"
        return ExportError(_unexportable_message(export_format, layer, reason, refused))
    first_line = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    for node_name in re.findall(r"[\w.\-]+(?:/[\w.\-]+)+", text):
        layer = layer_for_node(serving, node_name)
        if layer is not None:
            return ExportError(_unexportable_message(export_format, layer, clip(first_line, 300), []))
    return ExportError(
        f"{export_format} cannot express this model: the converter failed with {type(error).__name__}: "
        f"{clip(first_line, 300)}. Export to another format (saved_model runs every TensorFlow op), or rebuild "
        "the model from layers the format supports; --verbose shows the converter's own output."
    )


def runtime_refusal(export_format: str, serving: keras.Model, directory: Path, error: Exception) -> ExportError:
    """The format's own runtime refusing the converted file (onnxruntime has no kernel for what a
    valid ONNX operator was given, e.g. a cubic Resize over NHWC axes) as one paragraph naming the
    layer: the converted node the runtime names, else the layer whose TensorFlow op the operator
    it names came from."""
    text = str(error)
    # onnxruntime's messages end with the innermost reason after its last "FAIL : ".
    innermost = " ".join(text.rsplit("FAIL : ", 1)[-1].split()) or type(error).__name__
    detail = clip(re.sub(r"^\S+\.(?:h|cc):\d+ ", "", innermost), 160)
    node_names = [first or second for first, second in re.findall(r"Name:'([^']+)'|In Node, \(\"([^\"]+)\"", text)]
    operator_type = next((part for found in re.findall(r"in the (\w+) operator|running (\w+) node", text)
                          for part in found if part), None)  # fmt: skip
    layer = next((found for found in map(lambda name: layer_for_node(serving, name), node_names) if found), None)
    source_op = None
    if layer is None and operator_type:
        layer, source_op = _layer_with_op_like(serving, operator_type)
    runtime = {"saved_model": "TensorFlow", "onnx": "onnxruntime", "litert": "the LiteRT interpreter"}[export_format]
    if operator_type:
        made_of = f" made of the TensorFlow op {source_op}" if source_op else ""
        reason = f"{runtime} cannot run the {operator_type} operator{made_of} ({detail})"
    else:
        reason = f"{runtime} cannot run the converted model ({detail})"
    return ExportError(_unexportable_message(export_format, layer, reason, []))


def _layer_with_op_like(serving: keras.Model, operator_type: str):
    """(layer, TensorFlow op type) of the first op in `serving`'s graph whose type begins like the
    runtime's operator (an ONNX Resize comes from ResizeBilinear, ResizeBicubic ...), or (None, None):
    converters may rename the nodes they rewrite, so the op type is what is left to go by."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *serving.inputs[0].shape[1:]], tf.float32)
    graph = tf.function(lambda image: serving(image, training=False)).get_concrete_function(spec).graph
    for operation in graph.get_operations():
        if operation.type.lower().startswith(operator_type.lower()):
            layer = layer_for_node(serving, operation.name)
            if layer is not None:
                return layer, operation.type
    return None, None


def _unexportable_message(export_format: str, layer, reason: str, operators: list[str]) -> str:
    what = f"layer {layer.name} ({type(layer).__name__})" if layer is not None else "an operation of this model"
    others = sorted(set(operators[1:]) - set(operators[:1]))
    also = f" The model also uses {', '.join(others)}, which the format lacks too." if others else ""
    alternative = "saved_model runs every TensorFlow op" if export_format != "saved_model" else "onnx or litert"
    return (
        f"{export_format} cannot express {what}: {reason}.{also} Export to another format ({alternative}), "
        "or rebuild the model without that layer (or with options the format supports); nothing was written."
    )


def layer_for_node(model: keras.Model, node_name: str):
    """The innermost layer of `model` (nested models included) whose name scope a converted graph node
    sits in, e.g. `serving_1/cnn_1/resize_1/resize/ScaleAndTranslate` -> the layer `resize` of model
    `cnn`; None when no layer matches. TensorFlow makes a scope unique with a `_1` suffix, so a part
    matches a layer by its name as it is or without that suffix; parts that are not layers of the
    current model (the top model's own scope, an op's inner scope) are skipped."""
    found = None
    container = model
    for part in node_name.split("/"):
        layers = {layer.name: layer for layer in getattr(container, "layers", [])}
        layer = layers.get(part) or layers.get(re.sub(r"_\d+$", "", part))
        if layer is None:
            continue
        found = layer
        if getattr(layer, "layers", None):
            container = layer
    return found
