"""Build a signed bundle from a trained model: safetensors weights, fp32 ONNX, static int8
ONNX calibrated on real training faces, probe faces for the device's int8 self-check, and a
manifest with the accuracy of each.

Quantization (onnxruntime static QDQ): weights per output channel, activations asymmetric,
ranges calibrated on training faces the model saw (never test faces). The default types are
uint8 activations x uint8 weights (U8U8): its integer kernels cannot saturate on any x86 CPU
(each fused op within one quantization step of the QDQ graph: kernel_step_errors), so the int8
model the edge verifies is, up to rounding, the one a camera runs. onnxruntime's U8S8 kernels use VPMADDUBSW on CPUs without VNNI (AVX2
and plain AVX-512), which adds pairs of u8 x s8 products in saturating int16, so a bundle that
agrees with fp32 on the edge's VNNI CPU disagrees on a camera's AVX2 CPU (measured on an AVX2
EPYC, MobileNetV2 48 px on CK+48: U8S8 logits up to 2.0 away from the exact QDQ result, 89% vs
96% top-1 agreement with fp32; U8U8 within 0.2 there, 0.84 on an AVX-512 VNNI Xeon from
rounding amplified by depth, not saturation; docs/int8.md). U8S8 with reduce_range (7-bit
weights) is exact too and 1.3x faster, but agreed less with fp32 (95% vs 98% on 183 faces). The first
convolution (raw pixels, 3 input channels) and the last layer (the logits) stay fp32 by
default: they are tiny in compute and the most sensitive to rounding.
"""

from __future__ import annotations

import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import EmoshieldError
from ..paths import read_json
from .bundle import BUNDLE_FILES, ONNX_FP32, ONNX_INT8, PROBES, WEIGHTS, seal_bundle, write_probes
from .signing import load_private_key
from .wire import finite

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


@dataclass
class QuantizationOptions:
    """How model.int8.onnx is made."""

    calibration_images: int = 256
    method: str = "minmax"
    per_channel: bool = True
    keep_fp32: str = "first,last"  # first conv and/or last layer stay fp32 ("" = quantize all)
    activations: str = "uint8"
    # uint8 weights: exact integer kernels on every x86 CPU (module docstring); int8 weights take
    # onnxruntime's faster U8S8 path, which saturates without VNNI unless reduce_range is set
    weights: str = "uint8"
    reduce_range: bool = False  # 7-bit weights (U8S8 without overflow on CPUs without VNNI)
    probes: int = 64  # validation faces whose fp32 logits the device's int8 self-check compares with
    min_agreement: float = 0.9  # the self-check's threshold (top-1 agreement of int8 with fp32)

    def validate(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise EmoshieldError(f"unknown calibration method {self.method!r}; choose {', '.join(CALIBRATION_METHODS)}")
        if self.calibration_images < 1:
            raise EmoshieldError("calibration needs at least one image")
        unknown = set(filter(None, self.keep_fp32.split(","))) - {"first", "last"}
        if unknown:
            raise EmoshieldError(f"--keep-fp32 takes first and/or last, not {', '.join(sorted(unknown))}")
        for role in ("activations", "weights"):
            if getattr(self, role) not in ("uint8", "int8"):
                raise EmoshieldError(f"{role} are uint8 or int8, not {getattr(self, role)!r}")
        if not 0 <= self.probes <= 4096:
            raise EmoshieldError(f"--probes is a count of faces in [0, 4096], not {self.probes}")
        if not 0 < self.min_agreement <= 1:
            raise EmoshieldError(f"--self-check-min-agreement is in (0, 1], not {self.min_agreement}")


def export_onnx(model, path: Path, input_size: int) -> None:
    """fp32 ONNX with a dynamic batch axis: "image" (N x 3 x S x S, [0, 1]) -> "logits"."""
    import torch

    model.eval()
    dummy = torch.rand(1, 3, input_size, input_size)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated but exact for these CNNs and needs no
        # onnxscript; the torch.export one gives the same graph for them.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17,
                          dynamo=False)


def onnx_session(path: Path, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for float32 N x 3 x S x S images in [0, 1]."""
    return np.concatenate([session.run(None, {"image": images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray, options: QuantizationOptions) -> dict:
    """Static QDQ int8 quantization of fp32_path; returns what was kept in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, images: np.ndarray, batch: int = 32):
            self.batches = iter([{"image": images[i:i + batch]} for i in range(0, len(images), batch)])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared)).graph
        compute = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        keep = set(filter(None, options.keep_fp32.split(",")))
        exclude = ([compute[0].name] if "first" in keep and compute else []) + \
                  ([compute[-1].name] if "last" in keep and len(compute) > 1 else [])
        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                  "entropy": CalibrationMethod.Entropy}[options.method]
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        quantize_static(str(prepared), str(out_path), Reader(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=options.per_channel, reduce_range=options.reduce_range,
                        activation_type=types[options.activations], weight_type=types[options.weights],
                        nodes_to_exclude=exclude, calibrate_method=method,
                        extra_options={"ActivationSymmetric": False,
                                       # int8 weights centre on 0; uint8 weights take their own zero point
                                       "WeightSymmetric": options.weights == "int8"})
    return {"fp32_nodes": exclude, "quantized_nodes": len(compute) - len(exclude)}


class IslandCheck(NamedTuple):
    """One quantized op's check: its worst difference from the exact graph, in quantization
    steps, and the op types onnxruntime ran it with (an integer kernel such as QLinearConv when
    it fused; only float ops means both runs were fp32 and `steps` proves nothing)."""

    steps: int
    fused_ops: tuple[str, ...]

    @property
    def integer(self) -> bool:
        return any(op.startswith("QLinear") or op.startswith("QGemm") or op.endswith("Integer")
                   for op in self.fused_ops)


def kernel_step_errors(int8_path: Path, images: np.ndarray) -> dict[str, IslandCheck]:
    """How far this CPU's fused integer kernels are from the QDQ graph, one quantized op at a
    time: each island between QuantizeLinear outputs is fed the exact graph's own uint8 inputs
    and run both ways (fused kernels, and ORT_DISABLE_ALL: dequantize, fp32 op, quantize).
    Returns, per island output, the largest difference in quantization steps and the op types
    the fused run used (so a caller can tell an island that did not fuse from one that is exact).

    This is the property that holds on every CPU: correct kernels differ from the exact graph
    by rounding alone (<= 1 step per op), wherever they run. End to end, those single-step
    differences are amplified by depth (MobileNetV2's logits move by up to ~0.8 on a weak model
    on an AVX-512 VNNI/AMX Xeon, ~0.2 on an AVX2 EPYC), so a logit tolerance is not
    CPU-independent; a saturating kernel (U8S8 without VNNI) is many steps off in one op."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    def run(model, feed, exact, optimized=None):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3  # the optimized-graph dump warns that it is CPU-specific: it is meant to be
        if exact:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if optimized:
            options.optimized_model_filepath = str(optimized)
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(None, feed)

    model = onnx.load(str(int8_path))
    quantized = [n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    producer = {out: node for node in model.graph.node for out in node.output}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    zero_point_types = {i.name: i.data_type for i in model.graph.initializer}
    for node in (n for n in model.graph.node if n.op_type == "QuantizeLinear"):  # uint8 or int8 activations
        element = zero_point_types.get(node.input[2], onnx.TensorProto.UINT8) if len(node.input) > 2 else \
            onnx.TensorProto.UINT8
        probe.graph.output.append(helper.make_tensor_value_info(node.output[0], element, None))
    outputs = [o.name for o in probe.graph.output]
    exact = dict(zip(outputs, run(probe, {"image": images}, exact=True)))
    boundary, errors = set(quantized), {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in quantized:
            inputs, stack, seen = set(), [name], set()
            while stack:  # the quantized tensors this island reads
                node = producer.get(stack.pop())
                for tensor in node.input if node is not None else ():
                    if tensor in boundary:
                        inputs.add(tensor)
                    elif tensor in producer and tensor not in seen:
                        seen.add(tensor)
                        stack.append(tensor)
            if not inputs:  # the input's own quantization: nothing fused reads it
                continue
            island = Path(tmp) / "island.onnx"
            onnx.utils.extract_model(str(int8_path), str(island), sorted(inputs), [name])
            island_model = onnx.load(str(island))
            feed = {tensor: exact[tensor] for tensor in sorted(inputs)}
            optimized = Path(tmp) / "island.optimized.onnx"
            fused = run(island_model, feed, False, optimized)[0]
            reference = run(island_model, feed, True)[0]
            ops = tuple(sorted({n.op_type for n in onnx.load(str(optimized)).graph.node}))
            errors[name] = IslandCheck(int(np.abs(fused.astype(np.int32) - reference.astype(np.int32)).max()), ops)
    return errors


def face_margin(data) -> tuple[float, int]:
    """The device's crop margin for this model, measured on its (decoded) training faces."""
    from ..data.faces import calibrated_margin

    pixels = data.pixels.numpy()
    faces = pixels[:, 0] if pixels.shape[1] == 1 else pixels.transpose(0, 2, 3, 1)[..., ::-1]
    return calibrated_margin(faces[:64])


def _images(data) -> np.ndarray:
    from ..data.images import to_model_input

    return to_model_input(data.pixels).numpy()


def _probe_pixels(model_file: Path, data_root: str | None, count: int) -> tuple[np.ndarray, str] | None:
    """Up to `count` held-out faces (validation first, then test) as uint8 N x 3 x S x S, and
    which parts they came from."""
    from ..pipeline import decode_split_part

    pixels, parts = [], []
    for part in ("val", "test"):
        need = count - sum(len(p) for p in pixels)
        if need <= 0:
            break
        try:
            data, _, _ = decode_split_part(model_file, part, data_root, limit=need)
        except EmoshieldError:  # an empty part
            continue
        pixels.append(data.pixels.numpy())
        parts.append(part)
    if not pixels:
        return None
    faces = np.concatenate(pixels)
    return np.ascontiguousarray(np.broadcast_to(faces, (len(faces), 3, *faces.shape[2:]))), "+".join(parts)


def add_probes(bundle_dir: Path, pixels: np.ndarray, int8_threshold: float) -> dict:
    """Write the probe faces with the fp32 model's logits into the bundle (signed with it);
    returns the manifest's "self_check" entry, with the int8 agreement on this machine."""
    faces = pixels.astype(np.float32) / 255.0
    fp32 = onnx_logits(onnx_session(bundle_dir / ONNX_FP32), faces)
    int8 = onnx_logits(onnx_session(bundle_dir / ONNX_INT8), faces)
    write_probes(bundle_dir / PROBES, pixels, fp32)
    return {"file": PROBES, "probes": len(pixels), "min_agreement": int8_threshold,
            "export_agreement": float((int8.argmax(1) == fp32.argmax(1)).mean())}


def export_bundle(model_dir: Path, private_key: Path, out_dir: Path, name: str | None = None, version: int = 1,
                  data_root: str | None = None, quantization: QuantizationOptions | None = None,
                  log=print, robustness_file: Path | None = None) -> dict:
    """Write a signed bundle for the trained model in model_dir (its training output folder); the
    manifest's robustness headline comes from `robustness_file` (an `emoshield evaluate` result of
    this model), by default model_dir/robustness.json when there is one."""
    import torch

    from ..models.network import load_model, save_model
    from ..pipeline import decode_split_part
    from ..provenance import git_commit

    quantization = quantization or QuantizationOptions()
    quantization.validate()
    if version < 1:
        raise EmoshieldError("a bundle version is a positive integer")
    key = load_private_key(Path(private_key))
    model_dir = Path(model_dir)
    model_file = model_dir / "model.safetensors" if model_dir.is_dir() else model_dir
    model = load_model(model_file)
    # every file the manifest quotes is read and checked before anything is exported or written
    run = _read_json(model_file.parent / "run.json")
    train_metrics = _read_json(model_file.parent / "metrics.json")
    robustness_path = Path(robustness_file) if robustness_file else model_file.parent / "robustness.json"
    robustness = _read_json(robustness_path)
    if robustness_file and "robustness" not in robustness:
        raise EmoshieldError(f"{robustness_file} holds no `emoshield evaluate` robustness result")
    headline = _robust_headline(robustness, robustness_path) if robustness else None
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise EmoshieldError(f"{out_dir} exists and is not empty (a bundle is written once)")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    test, test_records, config = decode_split_part(model_file, "test", data_root)
    calib, _, _ = decode_split_part(model_file, "train", data_root, limit=quantization.calibration_images)
    x_test, y_test = _images(test), test.labels.numpy()
    log(f"bundle: {len(test_records)} test faces, {len(calib)} training faces for int8 calibration")

    save_model(model, out_dir / WEIGHTS)
    export_onnx(model, out_dir / ONNX_FP32, config.input_size)
    with torch.no_grad():
        torch_logits = torch.cat([model(torch.from_numpy(x_test[i:i + 128])) for i in range(0, len(x_test), 128)]).numpy()
    fp32_logits = onnx_logits(onnx_session(out_dir / ONNX_FP32), x_test)
    kept = quantize_int8(out_dir / ONNX_FP32, out_dir / ONNX_INT8, _images(calib), quantization)
    int8_logits = onnx_logits(onnx_session(out_dir / ONNX_INT8), x_test)
    probes = _probe_pixels(model_file, data_root, quantization.probes) if quantization.probes else None
    self_check = ({**add_probes(out_dir, probes[0], quantization.min_agreement), "faces": probes[1]}
                  if probes else None)

    def accuracy(logits):
        return float((logits.argmax(1) == y_test).mean())

    metrics = {"test_images": len(y_test), "test_accuracy": accuracy(torch_logits),
               "onnx_fp32_accuracy": accuracy(fp32_logits), "onnx_int8_accuracy": accuracy(int8_logits),
               "onnx_max_abs_diff": float(np.abs(torch_logits - fp32_logits).max()),
               "int8_prediction_agreement": float((int8_logits.argmax(1) == torch_logits.argmax(1)).mean())}
    metrics["int8_accuracy_change"] = metrics["onnx_int8_accuracy"] - metrics["test_accuracy"]
    gray = int(test.pixels.shape[1]) == 1
    margin, measured = face_margin(calib)
    log(f"bundle: face margin {margin:+.3f} (the device's detector box grown by this on each side frames faces "
        f"as the training images do; measured on {measured} of {len(calib)} training faces)")
    manifest = {
        "name": name or model_file.parent.name, "version": int(version),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "classes": list(config.classes),
        "preprocessing": {"input_size": config.input_size, "channels": "gray" if gray else "rgb",
                          "range": "[0, 1] float32, N x 3 x S x S (gray repeated on 3 channels)",
                          "normalization": {"mean": config.mean, "std": config.std, "inside_model": True},
                          "face_margin": margin, "face_margin_measured_on": measured,
                          "align": getattr(config, "align", "none"),
                          "resize": "area when shrinking, linear when enlarging"},
        "backbone": {"name": config.backbone, "head": config.head, "weights": config.weights,
                     "sha256": _backbone_sha256(config)},
        "training": {k: run.get(k) for k in ("dataset", "protocol", "fold", "folds", "epochs", "seed", "defense",
                                             "train_config", "git_commit", "extra_train", "nested_in") if k in run},
        "metrics": {**metrics, **{k: train_metrics[k] for k in ("best_epoch", "balanced_accuracy", "per_class_accuracy")
                                  if k in train_metrics},
                    **({"robustness": headline} if headline else {})},
        "quantization": {**asdict(quantization), **kept, "format": "QDQ",
                         "activations": f"{quantization.activations} asymmetric",
                         "weights": (f"{quantization.weights} " + ("symmetric" if quantization.weights == "int8"
                                                                  else "asymmetric")
                                     + (" 7-bit" if quantization.reduce_range else "")
                                     + (" per channel" if quantization.per_channel else ""))},
        **({"self_check": self_check} if self_check else {}),
        "exported_by": git_commit(),
    }
    manifest = seal_bundle(out_dir, manifest, key)
    log(f"bundle: {manifest['name']} v{version} in {out_dir} ({time.perf_counter() - started:.0f} s); "
        f"test accuracy torch {metrics['test_accuracy']:.2%}, ONNX fp32 {metrics['onnx_fp32_accuracy']:.2%}, "
        f"int8 {metrics['onnx_int8_accuracy']:.2%}; max |torch - ONNX| {metrics['onnx_max_abs_diff']:.1e}")
    return manifest


def copy_bundle(src: Path, dst: Path) -> None:
    """Copy the files of a bundle (and nothing else) into dst."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*BUNDLE_FILES, "manifest.json", "manifest.sig"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def _read_json(path: Path) -> dict:
    """A JSON object beside the model ({} when the file is absent); one line naming it otherwise."""
    if not path.is_file():
        return {}
    value = read_json(path)
    if not isinstance(value, dict):
        raise EmoshieldError(f"{path}: not a JSON object")
    return value


def _robust_headline(report: dict, path: Path) -> dict:
    """{"clean": accuracy, "ATTACK@EPS": accuracy, ...} of an `emoshield evaluate` result; a value
    that is not an accuracy in [0, 1] is one line naming the file (devices and the dashboard show it)."""
    rob = report.get("robustness", report)
    attacks = rob.get("attacks", {}) if isinstance(rob, dict) else None
    if not isinstance(attacks, dict) or not all(isinstance(by_eps, dict) and all(
            isinstance(v, dict) and finite(v.get("accuracy"), 0, 1) is not None for v in by_eps.values()) for by_eps in attacks.values()) \
            or not (rob.get("clean_accuracy") is None or finite(rob["clean_accuracy"], 0, 1) is not None):
        raise EmoshieldError(f"{path}: not an `emoshield evaluate` robustness result (attacks -> eps -> accuracy)")
    out = {"clean": rob.get("clean_accuracy")}
    for attack, by_eps in attacks.items():
        for eps, value in by_eps.items():
            out[f"{attack}@{eps}"] = value["accuracy"]
    return out


def _backbone_sha256(config) -> str | None:
    """sha256 of the file the backbone's initial weights came from, when it is a local file."""
    from ..models.backbones import imagenet_weights_path
    from .bundle import sha256_file

    weights = config.weights or ""
    if weights.endswith(".safetensors") and Path(weights).is_file():
        return sha256_file(Path(weights))
    if weights.startswith("imagenet"):
        path = imagenet_weights_path(config.backbone, weights.partition(":")[2] or None)
        return sha256_file(path) if path.is_file() else None
    return None
