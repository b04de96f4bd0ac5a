#!/usr/bin/env python3
"""Generate the committed test models under tests/fixtures/.

Needs the `fixtures` extra (TensorFlow CPU, scikit-learn) and no network: the digits
data is scikit-learn's bundled copy and MobileNetV2 is built with random weights.

    python scripts/make_test_models.py [--out tests/fixtures] [--only digits|mobilenet|signed]

Outputs (see tests/fixtures/README.md, which this script rewrites on a full run):
  digits_{fp32,int8}_r{1,2}.tflite, digits_val.npz, digits_labels.txt,
  mobilenetv2_int8.tflite, golden_frames/digit_<label>_<i>.{png,npy},
  digits_signed_int8.tflite (the digits CNN trained on inputs in [-1, 1]).
`digits_int8_meta.tflite` is made from digits_int8_r1.tflite by
scripts/add_tflite_metadata.py, in the main venv (it needs ai-edge-litert).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from fixture_spec import Config, Report, render_readme

# Quieten TensorFlow's C++ logging before it is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

try:
    import tensorflow as tf
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
except ImportError as err:
    sys.exit(f"make_test_models.py needs TensorFlow and scikit-learn (the fixtures extra): {err}")

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
RepresentativeData = Callable[[], Iterator[list[FloatArray]]]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "tests" / "fixtures"


def load_digits_32(cfg: Config) -> tuple[FloatArray, IntArray, FloatArray, IntArray]:
    """sklearn digits (8x8, 0..16) -> float32 (N,32,32,3) in [0,1], stratified split."""
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    resized = tf.image.resize(images, (cfg.image_size, cfg.image_size), method="bilinear")
    x = np.clip(np.repeat(resized.numpy(), 3, axis=-1), 0.0, 1.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=cfg.val_size, stratify=y, random_state=cfg.seed
    )
    return x_train, y_train, x_val, y_val


def augment(x: FloatArray, cfg: Config, rng: np.random.Generator) -> FloatArray:
    """Small random shifts plus Gaussian noise: the "fine-tuning" data of release 2."""
    out = np.empty_like(x)
    shifts = rng.integers(-cfg.r2_max_shift, cfg.r2_max_shift + 1, size=(len(x), 2))
    for i, (dy, dx) in enumerate(shifts):
        # Digits sit on a black background, so wrapping a 2-pixel border is harmless.
        out[i] = np.roll(x[i], (int(dy), int(dx)), axis=(0, 1))
    out += rng.normal(0.0, cfg.r2_noise_std, size=out.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def build_digits_cnn(cfg: Config) -> Any:
    """Small CNN with fixed layer names: the delta codec matches tensors by name."""
    layers = tf.keras.layers
    inp = tf.keras.Input((cfg.image_size, cfg.image_size, 3), name="image")
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="conv1")(inp)
    x = layers.MaxPooling2D(name="pool1")(x)
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(name="pool2")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    out = layers.Dense(10, activation="softmax", name="probs")(x)
    return tf.keras.Model(inp, out, name="digits")


def train(
    model: Any, x: FloatArray, y: IntArray, *, epochs: int, learning_rate: float, cfg: Config
) -> None:
    model.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=cfg.batch_size, shuffle=True, verbose=0)


def to_tflite(model: Any, representative: RepresentativeData | None) -> bytes:
    """FP32 when `representative` is None, else full-integer INT8 with int8 in/out."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    # The Keras exporter prints its SavedModel signature to stdout; keep stdout for results.
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(converter.convert())


def calibration_from(x: FloatArray, n: int) -> RepresentativeData:
    def gen() -> Iterator[list[FloatArray]]:
        for i in range(min(n, len(x))):
            yield [x[i : i + 1]]

    return gen


def tflite_accuracy(model_bytes: bytes, x: FloatArray, y: IntArray) -> float:
    """Top-1 accuracy through the TFLite interpreter, quantizing int8 inputs as a device would."""
    interp = tf.lite.Interpreter(model_content=model_bytes, num_threads=1)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    outp = interp.get_output_details()[0]
    correct = 0
    for xi, yi in zip(x, y, strict=True):
        sample = xi[np.newaxis]
        if inp["dtype"] == np.int8:
            scale, zero = inp["quantization"]
            sample = np.clip(np.round(sample / scale) + zero, -128, 127).astype(np.int8)
        interp.set_tensor(inp["index"], sample)
        interp.invoke()
        correct += int(np.argmax(interp.get_tensor(outp["index"])[0]) == yi)
    return correct / len(y)


def write_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    log.info("wrote %s (%d bytes)", path, len(data))


def write_golden_frames(out: Path, x: FloatArray, y: IntArray, cfg: Config) -> None:
    """One frame per distinct label, as both PNG (uint8 RGB) and float32 .npy."""
    frames = out / "golden_frames"
    frames.mkdir(parents=True, exist_ok=True)
    for old in frames.glob("digit_*"):
        old.unlink()
    seen: set[int] = set()
    for i, (xi, yi) in enumerate(zip(x, y, strict=True)):
        label = int(yi)
        if label in seen:
            continue
        seen.add(label)
        stem = frames / f"digit_{label}_{i}"
        np.save(stem.with_suffix(".npy"), xi.astype(np.float32))
        pixels = np.round(xi * 255.0).astype(np.uint8)
        write_bytes(stem.with_suffix(".png"), bytes(tf.io.encode_png(pixels).numpy()))
        if len(seen) == cfg.golden_frames:
            break


def seed_everything(seed: int) -> None:
    """Reseeded per group so `--only X` makes the same files as a full run."""
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_digits(out: Path, cfg: Config, report: Report) -> None:
    seed_everything(cfg.seed)
    x_train, y_train, x_val, y_val = load_digits_32(cfg)
    report.n_val = len(y_val)
    calibration = calibration_from(x_train, cfg.calibration_samples)
    model = build_digits_cnn(cfg)

    train(
        model, x_train, y_train, epochs=cfg.r1_epochs, learning_rate=cfg.r1_learning_rate, cfg=cfg
    )
    export_release(
        out, model, release=1, calibration=calibration, x_val=x_val, y_val=y_val, report=report
    )

    # Release 2 continues from release 1 on shifted, noisy copies, so every weight moves a bit
    # while the graph, and hence every tensor name, stays the same.
    rng = np.random.default_rng(cfg.seed + 2)
    x_aug = np.concatenate([x_train, augment(x_train, cfg, rng)])
    y_aug = np.concatenate([y_train, y_train])
    train(model, x_aug, y_aug, epochs=cfg.r2_epochs, learning_rate=cfg.r2_learning_rate, cfg=cfg)
    export_release(
        out, model, release=2, calibration=calibration, x_val=x_val, y_val=y_val, report=report
    )

    np.savez_compressed(out / "digits_val.npz", x=x_val, y=y_val)
    (out / "digits_labels.txt").write_text("".join(f"{i}\n" for i in range(10)))
    write_golden_frames(out, x_val, y_val, cfg)


def export_release(
    out: Path,
    model: Any,
    *,
    release: int,
    calibration: RepresentativeData,
    x_val: FloatArray,
    y_val: IntArray,
    report: Report,
) -> None:
    for variant, rep in (("fp32", None), ("int8", calibration)):
        name = f"digits_{variant}_r{release}.tflite"
        data = to_tflite(model, rep)
        write_bytes(out / name, data)
        report.accuracy[name] = tflite_accuracy(data, x_val, y_val)
        log.info("%s: val accuracy %.4f", name, report.accuracy[name])


def make_signed_digits(out: Path, cfg: Config, report: Report) -> None:
    """The digits CNN trained and calibrated on inputs in [-1, 1], as MobileNet-style models are.

    Fed [0, 1] instead, it scores far worse without any error: the silent failure
    the signed input contract exists to prevent.
    """
    seed_everything(cfg.seed + 4)
    x_train, y_train, x_val, y_val = load_digits_32(cfg)
    x_train, x_val_signed = x_train * 2.0 - 1.0, x_val * 2.0 - 1.0
    model = build_digits_cnn(cfg)
    train(
        model, x_train, y_train, epochs=cfg.signed_epochs, learning_rate=cfg.r1_learning_rate,
        cfg=cfg,
    )
    name = "digits_signed_int8.tflite"
    data = to_tflite(model, calibration_from(x_train, cfg.calibration_samples))
    write_bytes(out / name, data)
    report.accuracy[name] = tflite_accuracy(data, x_val_signed, y_val)
    report.wrong_range[name] = tflite_accuracy(data, x_val, y_val)
    log.info("%s: val accuracy %.4f in [-1,1], %.4f fed [0,1]", name,
             report.accuracy[name], report.wrong_range[name])  # fmt: skip


def make_mobilenet(out: Path, cfg: Config) -> None:
    seed_everything(cfg.seed + 1)
    size = cfg.mobilenet_size
    # A named input keeps the tensor name independent of Keras's global name counter.
    model = tf.keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        input_tensor=tf.keras.Input((size, size, 3), name="image"),
        weights=None,
        classes=cfg.mobilenet_classes,
    )
    rng = np.random.default_rng(cfg.seed + 3)
    # MobileNetV2 expects inputs preprocessed to [-1, 1].
    shape = (cfg.mobilenet_calibration_samples, size, size, 3)
    samples = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    # With fresh BatchNorm statistics (mean 0, variance 1) activations shrink layer by layer to
    # ~1e-12, giving a constant output and absurd quantization scales. One training-mode pass
    # with momentum 0 sets every moving mean/variance to the statistics it actually sees, so
    # activations keep a realistic range and the output depends on the input.
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model([samples], training=True)
    write_bytes(
        out / "mobilenetv2_int8.tflite",
        to_tflite(model, calibration_from(samples, len(samples))),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    parser.add_argument(
        "--only", choices=("digits", "mobilenet", "signed"),
        help="make one group; README is not rewritten",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # TensorFlow's own chatter (SavedModel export, interpreter deprecation) buries the results.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="tensorflow")

    cfg = Config()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    report = Report()
    if args.only in (None, "digits"):
        make_digits(out, cfg, report)
    if args.only in (None, "mobilenet"):
        make_mobilenet(out, cfg)
    if args.only in (None, "signed"):
        make_signed_digits(out, cfg, report)

    for name, value in sorted(report.accuracy.items()):
        print(f"{name:28s} val accuracy {value:.4f}")
    for name, value in sorted(report.wrong_range.items()):
        print(f"{name:28s} val accuracy fed [0,1] instead of [-1,1]: {value:.4f}")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"total fixture size: {total:,} bytes")
    if total > cfg.max_total_bytes:
        log.error("fixtures total %d bytes, over the %d limit", total, cfg.max_total_bytes)
        return 1
    weak = {name: acc for name, acc in report.accuracy.items() if acc < cfg.min_accuracy}
    if weak:
        log.error("accuracy below %.2f: %s", cfg.min_accuracy, weak)
        return 1
    if args.only is None:
        (out / "README.md").write_text(render_readme(out, cfg, report))
        log.info("wrote %s", out / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
