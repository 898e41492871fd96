"""Keras models through tf2onnx: the committed small sample and the Keras-applications corpus.

    python -m onnxcc.models.make_tf2onnx sample      # rewrites models/tf2onnx_mnv3_tiny.onnx
    python -m onnxcc.models.make_tf2onnx apps [DIR]  # Keras applications into the cache

Needs ``tensorflow`` and ``tf2onnx`` (not onnxcc dependencies: run it from an
environment that has them, e.g. ``pip install tensorflow-cpu tf2onnx``). The
graphs are what tf2onnx writes for a Keras model (``tf2onnx.convert.from_function``
at opset 13): every conv wrapped in NHWC↔NCHW Transposes, BatchNorm as a
Mul/Add pair in NHWC, hard-swish as ``x * Relu6(x + 3) / 6``, explicit Pads
before strided depthwise convs, squeeze-excite pooling as ``ReduceMean`` over
axes 1 and 2.

``sample`` builds a small MobileNetV3-style network from Keras layers (the
blocks keras.applications.MobileNetV3Small uses: hard-swish, squeeze-excite,
``ZeroPadding2D`` + strided depthwise conv, residual add) at 32×32, with
trained-like BatchNorm statistics, so the tests run on tf2onnx's own output
without TensorFlow. ``apps`` exports MobileNetV2, MobileNetV3-Small,
ResNet-50 and EfficientNet-B0 at 224×224 with ``weights=None`` (no download)
and randomised BatchNorm statistics into ``DIR`` (default
``$ONNXCC_CORPUS/tf2onnx``) for the benchmarks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "tf2onnx_mnv3_tiny.onnx"
APPS = ("mobilenet_v2", "mobilenet_v3_small", "resnet50", "efficientnet_b0")


def apps_dir() -> Path:
    from onnxcc.models.corpus import cache_dir

    return cache_dir() / "tf2onnx"


def _randomise_batchnorm(model, seed: int = 0) -> None:
    import keras
    import numpy as np

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(0.25, 1.75, n).astype("float32"), rng.normal(0, 0.2, n).astype("float32"),
                               rng.normal(0, 0.2, n).astype("float32"), rng.uniform(0.5, 1.5, n).astype("float32")])


def _export(model, hw: int, path: Path) -> Path:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, hw, hw, 3), tf.float32, name="input"),)
    fn = tf.function(lambda x: model(x, training=False))
    tf2onnx.convert.from_function(fn, input_signature=spec, opset=13, output_path=str(path))
    return path


def tiny_mobilenet_v3():
    import keras
    from keras import layers as L

    def hard_sigmoid(x):  # as keras.applications.mobilenet_v3 writes it
        return L.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)

    def hard_swish(x):
        return L.Multiply()([x, hard_sigmoid(x)])

    def se(x, c):
        s = L.GlobalAveragePooling2D(keepdims=True)(x)
        s = L.ReLU()(L.Conv2D(max(4, c // 4), 1)(s))
        return L.Multiply()([x, hard_sigmoid(L.Conv2D(c, 1)(s))])

    def block(x, cin, exp, cout, stride, act, use_se):
        y = act(L.BatchNormalization()(L.Conv2D(exp, 1, use_bias=False)(x)))
        if stride == 2:
            y = L.ZeroPadding2D(((0, 1), (0, 1)))(y)
        y = L.DepthwiseConv2D(3, stride, padding="same" if stride == 1 else "valid", use_bias=False)(y)
        y = act(L.BatchNormalization()(y))
        if use_se:
            y = se(y, exp)
        y = L.BatchNormalization()(L.Conv2D(cout, 1, use_bias=False)(y))
        return L.Add()([x, y]) if stride == 1 and cin == cout else y

    inp = keras.Input((32, 32, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = hard_swish(L.BatchNormalization()(L.Conv2D(16, 3, 2, padding="same", use_bias=False)(x)))
    x = block(x, 16, 16, 16, 2, L.ReLU(), True)
    x = block(x, 16, 48, 24, 2, L.ReLU(), False)
    x = block(x, 24, 64, 24, 1, hard_swish, True)
    x = hard_swish(L.BatchNormalization()(L.Conv2D(96, 1, use_bias=False)(x)))
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10, activation="softmax")(x)
    return keras.Model(inp, out)


def make_sample(path: Path = SAMPLE) -> Path:
    import keras

    keras.utils.set_random_seed(0)
    model = tiny_mobilenet_v3()
    _randomise_batchnorm(model)
    return _export(model, 32, path)


def make_apps(out: Path | None = None) -> dict[str, Path]:
    import keras

    out = Path(out or apps_dir())
    out.mkdir(parents=True, exist_ok=True)
    ctors = {"mobilenet_v2": keras.applications.MobileNetV2, "mobilenet_v3_small": keras.applications.MobileNetV3Small,
             "resnet50": keras.applications.ResNet50, "efficientnet_b0": keras.applications.EfficientNetB0}
    paths = {}
    for name in APPS:
        path = out / f"keras_{name}.onnx"
        if not path.exists():
            keras.utils.set_random_seed(0)
            model = ctors[name](weights=None, input_shape=(224, 224, 3), classes=1000)
            _randomise_batchnorm(model)
            tmp = path.with_suffix(".part")
            _export(model, 224, tmp)
            os.replace(tmp, path)
        paths[name] = path
    return paths


def cached_apps() -> dict[str, Path]:
    """The Keras applications already exported into the cache (none without a ``make_apps`` run)."""
    return {n: apps_dir() / f"keras_{n}.onnx" for n in APPS if (apps_dir() / f"keras_{n}.onnx").exists()}


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    what = sys.argv[1] if len(sys.argv) > 1 else "sample"
    if what == "sample":
        print(make_sample())
    else:
        for name, p in make_apps(Path(sys.argv[2]) if len(sys.argv) > 2 else None).items():
            print(name, p)
