"""Exporting a cnnflow model to ONNX (fp32) and ONNX Runtime static int8, and the gates each
format must pass. No MLflow runs here: `components/steps/export.py` logs and registers.

- `export_fp32`: `torch.onnx.export(..., dynamo=True)`, falling back to the TorchScript-based
  exporter for a model the dynamo path cannot take; dynamic batch dimension; the opset and
  the exporter that worked are recorded in the member's config.
- Formats (`@register_format`): `onnx` is the fp32 graph; `int8` is ONNX Runtime static
  quantization (QDQ, per-channel int8 weights, uint8 activations) after `quant_pre_process`,
  calibrated on images preprocessed by the model's own transform.
- Gates (`@register_gate`, one per format): the parity check's numbers in, the reason a
  format fails out (empty: it passes).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.errors import CnnflowError, one_line
from components.registrar import registrar
from components.serving.onnx_model import INPUT_NAME, ONNX_FILE, OUTPUT_NAME

# fp32 must give the PyTorch model's probabilities; int8 may lose at most a point of accuracy
# and must agree on the top-1 class for 98 % of the test images (issue 15).
FP32_MAX_PROB_DIFF = 1e-4
INT8_MAX_ACC_DROP = 0.01
INT8_MIN_AGREEMENT = 0.98
EXAMPLE_BATCH = 2  # traced with 2 images: batch 1 would be specialised away

FormatFn = Callable[[Path, Path, np.ndarray], None]
GateFn = Callable[[dict[str, float]], str]
FORMATS: dict[str, FormatFn] = {}
GATES: dict[str, GateFn] = {}
# `@register_format(name)` adds a format (fp32 graph, out path, calibration batch -> file);
# `@register_gate(name)` its pass rule. `--formats name` then works.
register_format = registrar(FORMATS, "export format")
register_gate = registrar(GATES, "export gate")


class ExportError(CnnflowError, RuntimeError):
    """A model or input an exporter cannot take; one line saying what to do."""


def check_formats(names: Sequence[str]) -> list[str]:
    """The requested formats, known and without repeats, or a one-line error."""
    if not names:
        raise ExportError(f"no format given: pass --formats with one or more of "
                          f"{', '.join(FORMATS)}")
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format '{unknown[0]}': use one or more of "
                          f"{', '.join(FORMATS)} (comma-separated)")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------------------------
# fp32: torch -> ONNX
# --------------------------------------------------------------------------------------------

_OPERATOR = re.compile(r"(aten(?:::|\.)[A-Za-z_0-9.]+|prim::[A-Za-z_0-9]+)")


def _operator(exc: BaseException) -> str:
    """The operator an exporter names in its error (`aten::foo`, `aten.foo.default`), if any."""
    found = _OPERATOR.search(str(exc))
    return found.group(1) if found else ""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and deprecation advice; cnnflow prints its own summary."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _dynamo(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=[INPUT_NAME],
                                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch},),
                                verbose=False)
    program.save(str(path))


def _torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(net, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME],
                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


# Tried in order: the dynamo exporter, then the TorchScript-based one (deprecated upstream, but
# it takes some models the dynamo path cannot).
EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path], None]] = {
    "dynamo": _dynamo, "torchscript": _torchscript}


def export_fp32(net: torch.nn.Module, image_size: int, path: Path, label: str = "model"
                ) -> dict[str, Any]:
    """Write `net` (eval mode, CPU, contiguous weights) as an fp32 ONNX graph with a dynamic
    batch dimension; returns {exporter, opset}. Both exporters failing is an `ExportError`
    naming the operator when the exporter's message names one."""
    import onnx

    net = net.cpu().to(memory_format=torch.contiguous_format).eval()
    example = torch.rand(EXAMPLE_BATCH, 3, image_size, image_size)
    errors, operators = [], []
    for name, exporter in EXPORTERS.items():
        try:
            with _quiet(), torch.no_grad():
                exporter(net, example, path)
            opset = next(o.version for o in onnx.load(str(path), load_external_data=False)
                         .opset_import if o.domain in ("", "ai.onnx"))
            return {"exporter": name, "opset": int(opset)}
        except Exception as exc:  # noqa: BLE001 - every failure falls through to the next
            operators.append(_operator(exc))
            errors.append(f"{name}: {one_line(exc)[:160]}")
    operator = next(filter(None, operators), "")
    what = f"operator {operator}" if operator else "; ".join(errors)
    raise ExportError(f"{label} cannot be exported to ONNX ({what}): export a model built "
                      "from supported layers, or keep serving it with PyTorch")


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------


@register_format("onnx")
def onnx_format(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """The fp32 graph as exported."""
    shutil.copyfile(fp32, out)


def _calibration_reader(batch: np.ndarray) -> Any:
    """ONNX Runtime's `CalibrationDataReader` over the calibration images, one at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(np.ascontiguousarray(batch[i:i + 1], dtype=np.float32)
                              for i in range(len(batch)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.items, None)
            return None if x is None else {INPUT_NAME: x}

    return Reader()


@register_format("int8")
def int8_format(fp32: Path, out: Path, calibration: np.ndarray) -> None:
    """Static int8: shape inference and graph clean-up (`quant_pre_process`), then QDQ with
    per-channel int8 weights and uint8 activations, ranges from the calibration images."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = _calibration_reader(calibration)
    prepared = out.with_suffix(".pre.onnx")
    with _quiet():
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    prepared.unlink(missing_ok=True)


def calibration_batch(transform: Callable[[Any], torch.Tensor], images: Sequence[Any]
                      ) -> np.ndarray:
    """N x 3 x H x W float32: the calibration images through the model's own preprocessing."""
    return torch.stack([transform(img) for img in images]).numpy().astype(np.float32)


def write_member(fmt: str, fp32: Path, exported: dict[str, Any], config: dict[str, Any],
                 folder: Path, calibration: np.ndarray) -> Path:
    """One model in one format as a member folder (`model_config.json` + `model.onnx`): the
    layout `OnnxClassifier` and an exported ensemble load. `exported`: what `export_fp32`
    returned (exporter, opset), recorded in the config beside the format."""
    folder.mkdir(parents=True, exist_ok=True)
    FORMATS[fmt](fp32, folder / ONNX_FILE, calibration)
    member = {**config, "format": fmt, **exported}
    (folder / "model_config.json").write_text(json.dumps(member, indent=2))
    return folder


# --------------------------------------------------------------------------------------------
# Gates and parity
# --------------------------------------------------------------------------------------------


@register_gate("onnx")
def fp32_gate(parity: dict[str, float]) -> str:
    """fp32 must reproduce the probabilities (to float rounding)."""
    diff = parity["max_abs_prob_diff"]
    if diff > FP32_MAX_PROB_DIFF:
        return f"max |dp| {diff:.3g} > {FP32_MAX_PROB_DIFF:g}"
    return ""


@register_gate("int8")
def int8_gate(parity: dict[str, float]) -> str:
    """int8 may cost at most `INT8_MAX_ACC_DROP` accuracy and must agree on top-1 for at least
    `INT8_MIN_AGREEMENT` of the test images."""
    reasons = []
    drop = -parity["test_acc_delta"]
    if drop > INT8_MAX_ACC_DROP + 1e-12:
        reasons.append(f"test accuracy drop {drop:.4f} > {INT8_MAX_ACC_DROP:g}")
    if parity["top1_agreement"] < INT8_MIN_AGREEMENT:
        reasons.append(f"top-1 agreement {parity['top1_agreement']:.4f} < "
                       f"{INT8_MIN_AGREEMENT:g}")
    return "; ".join(reasons)


def parity(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """How an export's test probabilities compare with the PyTorch model's (both N x C)."""
    ref_top, exp_top = reference.argmax(1), exported.argmax(1)
    acc, ref_acc = float((exp_top == labels).mean()), float((ref_top == labels).mean())
    return {"max_abs_prob_diff": float(np.abs(reference - exported).max()),
            "top1_agreement": float((ref_top == exp_top).mean()),
            "test_acc": acc, "test_acc_delta": acc - ref_acc}
