"""`python -m sciml export CKPT --format onnx|torchscript`: a trained network for use outside sciml.

The exported graph is `normaliser -> network [-> softmax]`: it takes the raw rows the plugin's reader produces
(what `model.input_shape` describes) and applies the training set's normalisation itself, so that HEP triggers,
forecast systems or clinical tools need nothing from sciml. Everything comes from the checkpoint: the plugin and
resolved config (`checkpoint["sciml"]`), the network's weights (the task's `model.` entries) and the normaliser's
statistics (the datamodule's state). The batch axis is dynamic; the other axes keep the traced shape
(`model.input_shape`, or `--input-shape`).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from torch import nn

from sciml.errors import SciMLError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
# The default opset of torch's exporter; onnxruntime runs opsets up to 21 and more.
OPSET = 18


def load(path: str | Path) -> dict:
    """The checkpoint as a dict; a file that is not a sciml checkpoint is a SciMLError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SciMLError(f"export: checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SciMLError(f"export: '{path}' is not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    record = checkpoint.get("sciml") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict) or "config" not in record or "state_dict" not in checkpoint:
        raise SciMLError(f"export: '{path}' carries no sciml config (not a checkpoint of a sciml run, or written "
                         "by an older sciml)")
    return checkpoint


def _datamodule_state(checkpoint: dict) -> dict | None:
    """The datamodule's state, stored by Lightning under the datamodule's class name (DataModule or a plugin's
    subclass): the entry that records a `normalize` choice."""
    for value in checkpoint.values():
        if isinstance(value, dict) and "normalize" in value and "normalizer" in value:
            return value
    return None


def build_normalizer(checkpoint: dict, channels: int) -> nn.Module:
    """The training set's normaliser with its fitted statistics; identity where the data has none."""
    from sciml.data.normalize import NORMALIZERS, Normalizer

    state = _datamodule_state(checkpoint)
    if state is None or not state.get("normalize") or state["normalize"] == "none":
        return nn.Identity()
    kind = str(state["normalize"])
    cls = NORMALIZERS.get(kind) or (get_class(kind) if "." in kind else None)
    if cls is None or not issubclass(cls, Normalizer):
        raise SciMLError(f"export: the checkpoint's data.normalize '{kind}' is not a known normaliser")
    normalizer = cls(channels)
    buffers = {k: torch.as_tensor(v).clone() for k, v in (state.get("normalizer") or {}).items()}
    normalizer.load_state_dict(buffers)
    if not normalizer.fitted:
        raise SciMLError(f"export: the checkpoint's normaliser ({kind}) was never fitted (a checkpoint saved before "
                         "the training data was read?)")
    return normalizer


def build_network(checkpoint: dict) -> nn.Module:
    """The network of `config["model"]` with the task's `model.` weights."""
    config = checkpoint["sciml"]["config"]
    try:
        network = instantiate(config["model"])
    except Exception as exc:
        raise SciMLError(f"export: cannot build the checkpoint's model ({config['model'].get('_target_')}): "
                         f"{type(exc).__name__}: {exc}") from None
    weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    network.load_state_dict(weights)
    return network


def pipeline(checkpoint: dict, probabilities: bool = False) -> nn.Sequential:
    """`normaliser -> network` (`-> softmax over axis 1` with `probabilities`), in eval mode."""
    config = checkpoint["sciml"]["config"]
    shape = input_shape(checkpoint)
    parts: list[nn.Module] = [build_normalizer(checkpoint, shape[0]), build_network(checkpoint)]
    if probabilities:
        task = get_class(config["task"]["_target_"])
        from sciml.tasks import ClassificationTask, SegmentationTask

        if not issubclass(task, (ClassificationTask, SegmentationTask)):
            raise SciMLError(f"export: --probabilities needs a classification or segmentation task, the checkpoint's "
                             f"is {task.__name__}")
        parts.append(nn.Softmax(dim=1))
    return nn.Sequential(*parts).eval()


def input_shape(checkpoint: dict) -> tuple[int, ...]:
    """One row's shape (no batch axis), as the data handed it to the model."""
    shape = checkpoint["sciml"]["config"]["model"].get("input_shape")
    if not shape:
        raise SciMLError("export: the checkpoint's config has no model.input_shape; give the row shape with "
                         "--input-shape C,H,W")
    return tuple(int(n) for n in shape)


def export(checkpoint_path: str | Path, fmt: str, output: str | Path | None = None, probabilities: bool = False,
           shape: tuple[int, ...] | None = None) -> Path:
    """Write the checkpoint's `normaliser -> network` as ONNX or TorchScript; returns the file written."""
    if fmt not in FORMATS:
        raise SciMLError(f"export: --format '{fmt}' is not one of {', '.join(FORMATS)}")
    checkpoint = load(checkpoint_path)
    if shape is None:
        shape = input_shape(checkpoint)
    model = pipeline(checkpoint, probabilities)
    example = torch.rand(2, *shape)  # two rows: a batch of one may be specialised away
    out = Path(output) if output else Path(checkpoint_path).with_suffix(FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"plugin": str(checkpoint["sciml"].get("plugin")), "input_shape": json.dumps(list(shape)),
                "output": "probabilities" if probabilities else "network output (logits for classification)",
                "config": json.dumps(checkpoint["sciml"]["config"])}
    with torch.no_grad():
        if fmt == "onnx":
            _onnx(model, example, out, metadata)
        else:
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(out), _extra_files={f"sciml_{k}": v for k, v in metadata.items()})
    return out


def _onnx(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> None:
    """TorchScript-based exporter (`dynamo=False`): deterministic, no onnxscript needed, and handles every plugin's
    network; the batch axis is dynamic. The metadata (plugin, input shape, config) goes into the model's
    metadata_props."""
    import onnx

    buffer = io.BytesIO()
    # A file-like `f` works with the TorchScript exporter; the stub only lists paths.
    torch.onnx.export(model, (example,), buffer, input_names=["x"], output_names=["y"],  # type: ignore[arg-type]
                      opset_version=OPSET, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        proto.metadata_props.add(key=f"sciml_{key}", value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def main(argv: list[str]) -> int:
    """`python -m sciml export CKPT --format onnx|torchscript [-o FILE] [--probabilities]`."""
    parser = argparse.ArgumentParser(
        prog="python -m sciml export",
        description="Write a trained network with its input normalisation built in, for use outside sciml: the "
                    "exported model takes raw rows (batch, *model.input_shape) as the plugin's reader gives them "
                    "and returns the network's output (logits for classification and segmentation, unless "
                    "--probabilities). The batch axis is dynamic. Tumor: the 2-D slice network, on slices of "
                    "z-scored cases (docs/export.md).")
    parser.add_argument("checkpoint", help="a checkpoint of a sciml run (RUN/checkpoints/best-*.ckpt or last.ckpt)")
    parser.add_argument("--format", "-f", required=True, help="onnx or torchscript")
    parser.add_argument("-o", "--output", help="file to write (default: the checkpoint's path with .onnx or .pt)")
    parser.add_argument("--probabilities", action="store_true",
                        help="append a softmax over the class axis (classification and segmentation tasks)")
    parser.add_argument("--input-shape", help="row shape to trace with, e.g. 2,240,240 (default: model.input_shape)")
    args = parser.parse_args(argv)
    try:
        shape = None
        if args.input_shape:
            try:
                shape = tuple(int(n) for n in args.input_shape.split(","))
            except ValueError:
                raise SciMLError(f"export: --input-shape '{args.input_shape}' is not comma-separated integers") \
                    from None
        out = export(args.checkpoint, args.format, args.output, args.probabilities, shape)
    except SciMLError as exc:
        print(f"sciml: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
