#!/usr/bin/env python3
"""Generate the FP32 fixtures that ``edgefleet model quantize`` starts from.

Needs the ``fixtures`` extra (TensorFlow CPU, scikit-learn) and no network; run it in
that environment (these files were made with ``/tmp/tfvenv``):

    python scripts/make_quantize_fixtures.py [--out tests/fixtures] [--only signed|mobilenet]

Outputs (described in tests/fixtures/README.md):

- ``digits_signed_fp32.tflite``: the FP32 original of ``digits_signed_int8.tflite``, the
  digits CNN trained on inputs in [-1, 1]. It is trained exactly as
  ``scripts/make_test_models.py`` trains that model (same code, seed and op determinism),
  and the script checks that the TFLite converter's INT8 of it is byte-identical to the
  committed INT8 file when that file is present.
- ``mobilenetv2_035_96_fp32.tflite``: a MobileNetV2-shaped classifier (alpha 0.35,
  96x96x3, 10 classes) trained on the same digits, upscaled to 96x96, in [-1, 1]: a
  real depthwise-separable network for the quantization benchmark, small enough to commit;
  ``mobilenetv2_035_96_int8.tflite`` is the TFLite converter's full-integer INT8 of it
  (int8 in/out, 200 training images as the representative dataset, as for the other
  INT8 fixtures), what ``scripts/bench_quantize.py`` compares EdgeFleet's INT8 with.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_test_models as base  # needs the path above; imports TensorFlow
import tensorflow as tf  # already imported by make_test_models, quietened there
from fixture_spec import Config

log = logging.getLogger(__name__)

MOBILENET_SIZE = 96
MOBILENET_ALPHA = 0.35
MOBILENET_EPOCHS = 6
MOBILENET_LEARNING_RATE = 1e-3
BATCHNORM_SAMPLES = 512


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_signed_fp32(out: Path, cfg: Config) -> None:
    """Repeat make_test_models.make_signed_digits, exporting the float model as well."""
    base.seed_everything(cfg.seed + 4)
    x_train, y_train, x_val, y_val = base.load_digits_32(cfg)
    x_train, x_val_signed = x_train * 2.0 - 1.0, x_val * 2.0 - 1.0
    model = base.build_digits_cnn(cfg)
    base.train(
        model, x_train, y_train, epochs=cfg.signed_epochs, learning_rate=cfg.r1_learning_rate,
        cfg=cfg,
    )  # fmt: skip
    fp32 = base.to_tflite(model, None)
    int8 = base.to_tflite(model, base.calibration_from(x_train, cfg.calibration_samples))
    committed = out / "digits_signed_int8.tflite"
    if committed.exists():
        same = sha256(committed.read_bytes()) == sha256(int8)
        log.info("converter INT8 of the retrained model matches %s: %s", committed.name, same)
    base.write_bytes(out / "digits_signed_fp32.tflite", fp32)
    log.info(
        "digits_signed_fp32.tflite: val accuracy %.4f in [-1,1]",
        base.tflite_accuracy(fp32, x_val_signed, y_val),
    )


def upscale(x: Any, size: int) -> Any:
    """(N,32,32,3) in [0,1] -> (N,size,size,3) in [-1,1], through uint8 as a camera gives."""
    pixels = np.round(np.asarray(x) * 255.0).astype(np.uint8)
    resized = tf.image.resize(pixels.astype(np.float32), (size, size), method="bilinear")
    return (resized.numpy() / 127.5 - 1.0).astype(np.float32)


def make_mobilenet_fp32(out: Path, cfg: Config) -> None:
    base.seed_everything(cfg.seed + 5)
    x_train, y_train, x_val, y_val = base.load_digits_32(cfg)
    x_train, x_val = upscale(x_train, MOBILENET_SIZE), upscale(x_val, MOBILENET_SIZE)
    size = MOBILENET_SIZE
    model = tf.keras.applications.MobileNetV2(
        input_shape=(size, size, 3),
        input_tensor=tf.keras.Input((size, size, 3), name="image"),
        alpha=MOBILENET_ALPHA,
        weights=None,
        classes=10,
    )
    base.train(
        model, x_train, y_train, epochs=MOBILENET_EPOCHS,
        learning_rate=MOBILENET_LEARNING_RATE, cfg=cfg,
    )  # fmt: skip
    # Keras's MobileNetV2 keeps BatchNorm statistics with momentum 0.999: after a few hundred
    # steps they are still near their initial values and inference outputs one class. One
    # training-mode pass with momentum 0 sets them to the statistics of the training images.
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x_train[:BATCHNORM_SAMPLES], training=True)
    calibration = base.calibration_from(x_train, cfg.calibration_samples)
    for name, rep in (("mobilenetv2_035_96_fp32.tflite", None),
                      ("mobilenetv2_035_96_int8.tflite", calibration)):  # fmt: skip
        data = base.to_tflite(model, rep)
        base.write_bytes(out / name, data)
        log.info("%s: val accuracy %.4f", name, base.tflite_accuracy(data, x_val, y_val))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=base.DEFAULT_OUT)
    parser.add_argument("--only", choices=("signed", "mobilenet"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = Config()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "signed"):
        make_signed_fp32(args.out, cfg)
    if args.only in (None, "mobilenet"):
        make_mobilenet_fp32(args.out, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
