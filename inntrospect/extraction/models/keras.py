"""Keras models: load, pick layers, compute activations and gradients per batch.

The only module that imports TensorFlow. Activations and gradients follow
``REFERENCE.md`` §2: inference mode, float32, the model's input and output
layers always included, ``g_i = d output_i[t_i] / d a_i`` for every chosen
layer but the output, ``t_i`` the argmax of the output or the corpus target.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from collections.abc import Sequence

import numpy as np

from ...errors import ModelError
from ...store.format import LayerSpec
from .source import ModelSource, check_layer_names, model_source

__all__ = ["KerasModel", "load_model", "import_tensorflow"]


#: TensorFlow's native start-up chatter, printed before its log level applies: absl's notice,
#: INFO lines (oneDNN, "Could not find cuda drivers") and the failed CUDA probe of a CPU machine
_TF_NOISE = re.compile(rb"^(WARNING: All log messages before absl::InitializeLog\(\)"
                       rb"|I\d{4} [\d:.]+ +\d+ \S+\] "
                       rb"|E\d{4} [\d:.]+ +\d+ cuda\w*\.cc:\d+\] failed call to cuInit)")


def import_tensorflow():
    """Import TensorFlow (once) without its start-up INFO lines on standard error."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _native_stderr_filtered(_TF_NOISE):
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe logs here, inside the filter
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ModelError(
            "extracting activations needs TensorFlow: pip install 'inntrospect[tensorflow]'"
        ) from err
    return tf


@contextlib.contextmanager
def _native_stderr_filtered(noise: re.Pattern):
    """File descriptor 2 through a pipe that drops lines matching ``noise``, for native code's output.

    TensorFlow's C++ start-up lines ignore ``TF_CPP_MIN_LOG_LEVEL``; they can
    only be caught at the descriptor. Everything else passes through unchanged.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
    except (OSError, ValueError):  # no usable descriptor 2: nothing to filter
        yield
        return

    def pump():
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not noise.match(line):
                    os.write(saved, line)

    thread = threading.Thread(target=pump, name="inntrospect-tf-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees its end
        thread.join(timeout=5)
        os.close(saved)


class KerasModel:
    """A loaded Keras model (Keras 3 or tf_keras) with the layers to record.

    Parameters
    ----------
    source
        Where the model comes from (see :func:`inntrospect.extraction.models.model_source`).
    layers
        Names of the layers of interest. The input and output layers are added;
        the result is in model order.
    """

    def __init__(self, source: ModelSource, layers: Sequence[str] | None = None):
        self.source = source
        self.model, self.framework = _load(source)
        model = self.model
        if len(model.inputs) != 1 or len(_true_outputs(model)) != 1:
            raise ModelError(
                f"{source.describe()} has {len(model.inputs)} inputs; inntrospect needs a model "
                "with one input and one output."
            )
        self._input_layer = model.inputs[0]._keras_history[0]
        self._output_layer = model.layers[-1]
        self.layer_names = [self._input_layer.name] + [
            layer.name for layer in model.layers if layer is not self._input_layer
        ]
        _refuse_channels_first(model)
        self.input_shape = tuple(model.inputs[0].shape[1:])
        if model.inputs[0].dtype not in ("float32", "float16", "float64", "bfloat16"):
            raise ModelError(
                f"the model's input has dtype {model.inputs[0].dtype}; gradients need a "
                "floating-point input."
            )
        out_shape = tuple(self._output_layer.output.shape[1:])
        if len(out_shape) != 1:
            raise ModelError(
                f"the output layer {self._output_layer.name!r} has per-sample shape {out_shape}; "
                "the gradient target needs a vector output (batch, classes)."
            )
        self.n_outputs = int(out_shape[0])
        self.layers = self._select(layers)
        self._step = None

    # -- layers ----------------------------------------------------------------
    def _select(self, wanted: Sequence[str] | None) -> list[LayerSpec]:
        wanted = check_layer_names(wanted, self.layer_names, self.source.describe())
        keep = set(wanted) | {self._input_layer.name, self._output_layer.name}
        infos = []
        for name in self.layer_names:
            if name not in keep:
                continue
            layer = self.model.get_layer(name)
            try:
                shape = tuple(layer.output.shape[1:])
            except (AttributeError, RuntimeError, ValueError) as err:
                raise ModelError(
                    f"layer {name!r} is used more than once in the model or has several "
                    f"outputs ({err}); pick a layer with one output."
                ) from err
            infos.append(LayerSpec(name, shape, name != self._output_layer.name))
        return infos

    def fix_shapes(self, sample_shape: tuple[int, ...]) -> None:
        """Resolve layer sizes left open by the model (``None``) from the corpus's sample shape."""
        if all(s is not None for info in self.layers for s in info.shape):
            return
        acts, _, _ = self.compute(np.zeros((1, *sample_shape), np.float32))
        self.layers = [
            LayerSpec(info.name, tuple(int(s) for s in a.shape[1:]), info.has_grads)
            for info, a in zip(self.layers, acts)
        ]

    def identity(self) -> dict:
        ident = {"framework": self.framework, "versions": _versions(self.framework)}
        ident.update(self.source.identity())
        if ident.get("sha256") is None:  # named model with random weights: hash them
            import hashlib

            h = hashlib.sha256()
            for w in self.model.get_weights():
                h.update(np.ascontiguousarray(w).tobytes())
            ident["sha256"] = h.hexdigest()
        return ident

    # -- compute ---------------------------------------------------------------
    def _build_step(self, jit_compile: bool):
        tf = import_tensorflow()
        model = self.model
        Model = _model_class(self.framework)
        inner = [info.name for info in self.layers[1:]]  # the input layer is x itself
        sub = Model(inputs=model.inputs[0], outputs=[model.get_layer(n).output for n in inner])
        n_out = self.n_outputs
        spec = [
            tf.TensorSpec((None, *self.input_shape), tf.float32),
            tf.TensorSpec((None,), tf.int32),
        ]

        @tf.function(input_signature=spec, jit_compile=jit_compile)
        def step(x, t):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outs = sub(x, training=False)
                if not isinstance(outs, (list, tuple)):
                    outs = [outs]
                outs = [tf.cast(o, tf.float32) for o in outs]
                y = outs[-1]
                pred = tf.argmax(y, axis=-1, output_type=tf.int32)
                chosen = tf.where(t < 0, pred, t)
                picked = tf.reduce_sum(y * tf.one_hot(chosen, n_out, dtype=y.dtype))
            grads = tape.gradient(
                picked, [x, *outs[:-1]], unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            return [x, *outs], grads, pred

        return step

    def compute(self, x: np.ndarray, targets: np.ndarray | None = None, pad_to: int | None = None):
        """Activations and gradients of one batch.

        Parameters
        ----------
        x
            Inputs ``(batch, *input_shape)``.
        targets
            Output index per sample for the gradient, or ``None``/-1 for the argmax.
        pad_to
            Pad a shorter batch with zeros to this many samples (results are cut
            back): one compiled shape serves every batch. Samples do not interact
            in inference mode, so padding changes no result.

        Returns
        -------
        acts, grads, prediction
            ``acts`` and ``grads``: lists of float32 arrays in the order of
            :attr:`layers` (``grads`` has no entry for the output layer);
            ``prediction``: argmax of the output per sample.
        """
        n = len(x)
        x = np.asarray(x, dtype=np.float32)
        t = np.full(n, -1, np.int32) if targets is None else np.asarray(targets, np.int32)
        if pad_to is not None and n < pad_to:
            x = np.concatenate([x, np.zeros((pad_to - n, *x.shape[1:]), np.float32)])
            t = np.concatenate([t, np.full(pad_to - n, -1, np.int32)])
        acts, grads, pred = self._run(x, t)
        # np.asarray views the tensors' buffers (no copy); the views keep them alive
        return (
            [np.asarray(a)[:n] for a in acts],
            [np.asarray(g)[:n] for g in grads],
            np.asarray(pred)[:n].astype(np.int64),
        )

    def _run(self, x, t):
        """The compiled step: XLA where the model allows it (about 2x faster on CPU)."""
        if self._step is None:
            self._step = self._build_step(jit_compile=True)
            try:
                return self._step(x, t)
            except Exception:  # noqa: BLE001 - an op XLA cannot compile: plain graph mode
                self._step = self._build_step(jit_compile=False)
        return self._step(x, t)


def load_model(
    model: str | os.PathLike | ModelSource,
    layers: Sequence[str] | None = None,
    weights: str | os.PathLike | None = None,
) -> KerasModel:
    """Load a model by path or ``keras.applications`` name, with its layers of interest."""
    return KerasModel(model_source(model, weights), layers)


def _load(source: ModelSource):
    import_tensorflow()
    if source.kind == "savedmodel":
        try:
            import tf_keras
        except ImportError as err:  # pragma: no cover
            raise ModelError(
                "legacy SavedModel folders load with tf_keras: pip install 'inntrospect[tensorflow]'"
            ) from err
        try:
            return tf_keras.models.load_model(str(source.path), compile=False), "tf_keras"
        except Exception as err:  # noqa: BLE001
            raise ModelError(f"could not load the SavedModel {source.path}: {err}") from err
    import keras

    if source.kind == "keras":
        try:
            return keras.models.load_model(str(source.path), compile=False), "keras"
        except Exception as err:  # noqa: BLE001
            if source.path.suffix in (".h5", ".hdf5"):
                try:
                    import tf_keras

                    return tf_keras.models.load_model(str(source.path), compile=False), "tf_keras"
                except Exception:  # noqa: BLE001
                    pass
            raise ModelError(
                f"could not load the model file {source.path} as a Keras model ({err}). Give a model "
                "saved with model.save() (.keras or .h5), or a SavedModel folder."
            ) from err
    names = {n.lower(): n for n in dir(keras.applications) if n[:1].isupper()}
    key = source.name.lower()
    if key not in names:
        raise ModelError(
            f"{source.name!r} is neither an existing model path nor a keras.applications model. "
            f"Known names: {', '.join(sorted(names.values()))}."
        )
    ctor = getattr(keras.applications, names[key])
    try:
        return ctor(weights=None if source.weights is None else str(source.weights)), "keras"
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"could not build {names[key]} with weights {source.weights}: {err}") from err


def _true_outputs(model) -> list:
    """The model's own outputs; introspection models that also output every layer count once."""
    outs = list(model.outputs)
    last = model.layers[-1]
    if len(outs) > 1 and any(o._keras_history[0] is last for o in outs):
        return [o for o in outs if o._keras_history[0] is last]
    return outs


def _refuse_channels_first(model) -> None:
    for layer in model.layers:
        fmt = getattr(layer, "data_format", None)
        if fmt == "channels_first":
            raise ModelError(
                f"layer {layer.name!r} uses data_format='channels_first'; inntrospect assumes "
                "channels-last (unit axis last). Rebuild the model with channels_last layers "
                "(keras.config.set_image_data_format('channels_last')) and load its weights."
            )


def _model_class(framework: str):
    if framework == "tf_keras":
        import tf_keras

        return tf_keras.Model
    import keras

    return keras.Model


def _versions(framework: str) -> dict:
    tf = import_tensorflow()
    v = {"tensorflow": tf.__version__}
    if framework == "tf_keras":
        import tf_keras

        v["tf_keras"] = tf_keras.__version__
    else:
        import keras

        v["keras"] = keras.__version__
    return v
