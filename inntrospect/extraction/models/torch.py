"""PyTorch models: build, pick modules, compute activations and gradients per batch.

The only module that imports PyTorch (when a torch model is used). The
interface is :class:`~inntrospect.extraction.models.keras.KerasModel`'s, and so
are the definitions (``REFERENCE.md`` §2): eval mode, float32, the input and
output always recorded, ``g_i = d output_i[t_i] / d a_i`` for every chosen layer
but the output, ``t_i`` the argmax of the output or the corpus target.

Layers are ``named_modules()`` names. A chosen module's output is taken by a
forward hook; the model's input is the layer ``"input"``; the output layer is
the last module (in ``named_modules()`` order) that returns the model's output
itself, or ``"output"`` when the forward changes it after the last module.

Layout: torch puts channels first, ``(N, C, *spatial)``; the store puts units
last, ``(sample, *spatial, unit)``, as Keras does. Every array of rank >= 3
with the batch axis (the input included) is stored with its axis 1 moved last;
rank-2 arrays ``(N, features)`` are stored as they are. The conversion is
recorded in the model's identity (``layout``: the torch shape and the axes
order of every layer). A module whose output of rank >= 3 is already
channels-last (e.g. a ``Linear`` on ``(N, T, D)``) is moved all the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence

import numpy as np

from ...errors import CorpusError, MissingDependencyError, ModelError
from ...store.format import LayerSpec
from .source import TORCH_INSTALL, ModelSource, check_layer_names

__all__ = ["TorchModel", "import_torch", "INPUT", "OUTPUT", "LAYOUT"]

#: the store's name of the model's input
INPUT = "input"
#: the store's name of the model's output when no module returns it as it is
OUTPUT = "output"
#: how arrays are laid out in torch and in the store
LAYOUT = {"torch": "channels_first", "stored": "channels_last"}


def import_torch():
    """Import PyTorch, with an install hint when it is missing."""
    try:
        import torch
    except ImportError as err:
        raise MissingDependencyError(f"PyTorch models need PyTorch: {TORCH_INSTALL}") from err
    return torch


def stored_axes(rank: int) -> list[int]:
    """Per-sample axes order from torch to the store: ``(C, *spatial)`` -> ``(*spatial, C)``."""
    return [*range(1, rank), 0] if rank >= 2 else list(range(rank))


class TorchModel:
    """A ``torch.nn.Module`` with the layers to record; :class:`KerasModel`'s interface.

    Parameters
    ----------
    source
        A torch :class:`ModelSource`: a factory (with optional ``state_dict``
        file) or a module object.
    layers
        ``named_modules()`` names of the layers of interest. The input
        (``"input"``) and the output are added; the result is in model order.

    Torch modules do not declare their input shape: :attr:`input_shape` and
    the layers' shapes are None until :meth:`fix_shapes` runs the module once
    on the corpus's sample shape (which also finds the output layer, and
    refuses chosen modules called more than once or returning no single tensor).

    A factory's model is converted to the ``channels_last`` memory format and
    image batches are fed in it (values unchanged; on CPU convolutions run
    about twice as fast, and the store's channels-last arrays need no copy); a
    module object is used in the memory format it has (``module.to(
    memory_format=torch.channels_last)`` before extracting gives the same speed).

    ``threads``: torch's intra-op threads while computing (restored after each
    call). Default: two fewer than torch's own (at least 1), which leaves two
    cores to the extraction's two writer threads: torch's OpenMP threads wait
    for each other at every operation, and a core taken by a writer thread
    stalls them all (on 2 cores, 2 torch threads ran the extraction 2-4 times
    slower than 1; see ``benchmarks/bench_extract_torch.py``).
    """

    framework = "torch"

    def __init__(self, source: ModelSource, layers: Sequence[str] | None = None,
                 threads: int | None = None):
        self._torch = torch = import_torch()
        self.source = source
        self.threads = max(1, torch.get_num_threads() - 2) if threads is None else int(threads)
        self.module = _build(source, torch)
        self.input_shape: tuple[int, ...] | None = None
        self.n_outputs: int | None = None
        modules = dict(self.module.named_modules())
        modules.pop("", None)  # the model itself: its output is the output layer
        if INPUT in modules:
            raise ModelError(f"{source.describe()} has a module named {INPUT!r}, the name the store "
                             "gives the model's input; rename that module.")
        self._modules = modules
        self.layer_names = [INPUT, *modules]
        wanted = check_layer_names(layers, self.layer_names, source.describe(), " (named_modules() names)")
        keep = set(wanted)
        self._chosen = [n for n in modules if n in keep]  # model order
        self._output = OUTPUT
        self._shapes: dict[str, tuple[int, ...]] = {}  # torch per-sample shape of every layer
        self._clone = False  # whether recorded outputs are changed in place later in the forward pass
        # image batches (N, C, H, W) in channels_last memory format: the layout the store wants (its
        # moves cost no copy) and twice as fast on CPU for convolutions; a factory's model is converted,
        # a module object is used in the memory format it has
        cl = torch.channels_last
        if source.module is None:
            self.module.to(memory_format=cl)
        self._channels_last = any(p.ndim == 4 and p.is_contiguous(memory_format=cl) and not p.is_contiguous()
                                  for p in self.module.parameters())
        self._dtype = next((p.dtype for p in (*self.module.parameters(), *self.module.buffers())
                            if p.is_floating_point()), self._torch.float32)
        self.layers = [LayerSpec(INPUT, None, True), *(LayerSpec(n, None, True) for n in self._chosen),
                       LayerSpec(OUTPUT, None, False)]

    # -- layers ----------------------------------------------------------------
    @property
    def _hidden(self) -> list[str]:
        """Chosen modules recorded by hooks, the output layer left out."""
        return [n for n in self._chosen if n != self._output]

    def fix_shapes(self, sample_shape: tuple[int, ...]) -> None:
        """Run the module once on zeros of the corpus's sample shape: shapes, output layer, checks."""
        torch = self._torch
        sample_shape = tuple(int(s) for s in sample_shape)
        x = torch.zeros((1, *sample_shape), dtype=self._dtype)
        calls: dict[str, list] = {}

        def probe(name):
            def hook(module, inputs, output):
                calls.setdefault(name, []).append(output)
            return hook

        handles = [m.register_forward_hook(probe(n)) for n, m in self._modules.items()]
        try:
            with _eval_mode(self.module), torch.no_grad():
                y = self.module(x)
        except ModelError:
            raise
        except Exception as err:  # noqa: BLE001 - any error of the module's forward
            raise CorpusError(
                f"{self.source.describe()} cannot take the corpus's samples of shape {sample_shape} "
                f"(batches of shape (n, {', '.join(map(str, sample_shape))})): {type(err).__name__}: "
                f"{err}. The batch files must hold what the module takes, channels first, e.g. "
                "(n, 1, 28, 28) for grey 28 x 28 images."
            ) from err
        finally:
            for h in handles:
                h.remove()
        if not isinstance(y, torch.Tensor) or y.ndim != 2:
            what = (f"shape {tuple(y.shape)}" if isinstance(y, torch.Tensor) else f"a {type(y).__name__}")
            raise ModelError(
                f"{self.source.describe()} returns {what}; the gradient target needs one output tensor "
                "of shape (batch, classes)."
            )
        # the output layer: the last module in named_modules() order (a container's last child after
        # it) returning the model's output itself, called once
        returning = [n for n in self._modules if len(calls.get(n, ())) == 1 and calls[n][0] is y]
        self._output = returning[-1] if returning else OUTPUT
        if self._output == OUTPUT and OUTPUT in self._modules:
            raise ModelError(f"{self.source.describe()} has a module named {OUTPUT!r} that does not "
                             "return the model's output, the name the store gives it; rename that module.")
        for name in self._hidden:
            _check_output(name, calls.get(name, []), self.source)
        self.input_shape = sample_shape
        self.n_outputs = int(y.shape[1])
        self._shapes = {INPUT: sample_shape, **{n: tuple(calls[n][0].shape[1:]) for n in self._hidden},
                        self._output: tuple(y.shape[1:])}
        names = [INPUT, *self._hidden, self._output]
        self.layers = [
            LayerSpec(n, tuple(self._shapes[n][k] for k in stored_axes(len(self._shapes[n]))),
                      n != self._output)
            for n in names
        ]

    def identity(self) -> dict:
        """Framework, versions, the source (factory, weights, sha256) and the layout conversion."""
        torch = self._torch
        ident = {"framework": self.framework, "versions": {"torch": torch.__version__}}
        ident.update(self.source.identity())
        if ident.get("sha256") is None:  # no weights file: hash the state_dict (and the factory file)
            h = hashlib.sha256(b"torch-state\0" + (ident.get("factory_sha256") or "").encode())
            for key, value in self.module.state_dict().items():
                t = value.detach().cpu().contiguous()
                h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            ident["sha256"] = h.hexdigest()
        ident["layout"] = {
            **LAYOUT,
            "layers": {info.name: {"torch_shape": list(self._shapes.get(info.name, ())),
                                   "axes": stored_axes(len(self._shapes.get(info.name, ())))}
                       for info in self.layers},
        }
        return ident

    # -- compute ---------------------------------------------------------------
    def compute(self, x: np.ndarray, targets: np.ndarray | None = None, pad_to: int | None = None):
        """Activations and gradients of one batch, stored layout (units last).

        Parameters
        ----------
        x
            Inputs ``(batch, *input_shape)`` as the module takes them (channels first).
        targets
            Output index per sample for the gradient, or ``None``/-1 for the argmax.
        pad_to
            Taken for :class:`KerasModel`'s interface and not needed: torch runs
            eagerly, so a short batch runs as it is (samples do not interact in
            eval mode, so the results are the same).

        Returns
        -------
        acts, grads, prediction
            ``acts`` and ``grads``: lists of float32 arrays in the order of
            :attr:`layers` (``grads`` has no entry for the output layer), rank
            >= 2 per sample with the channel axis moved last; ``prediction``:
            argmax of the output per sample.
        """
        torch = self._torch
        n = len(x)
        if not self._shapes:
            self.fix_shapes(tuple(np.shape(x)[1:]))
        arr = np.ascontiguousarray(x, dtype=np.float32)
        xt = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch warns on read-only
        if self._dtype != torch.float32:
            xt = xt.to(self._dtype)
        if self._channels_last and xt.ndim == 4:
            xt = xt.contiguous(memory_format=torch.channels_last)
        xt.requires_grad_(True)
        seen: dict[str, list] = {}
        versions: dict[str, int] = {}
        hidden, clone = self._hidden, self._clone

        def record(name):
            def hook(module, inputs, output):
                seen.setdefault(name, []).append(output)
                _check_output(name, seen[name], self.source)
                if clone:  # downstream gets a copy: an in-place op after the layer (ReLU(inplace=True))
                    return output.clone()  # leaves its output, and the gradient, as the module returned it
                versions[name] = output._version
                return None
            return hook

        handles = [self._modules[name].register_forward_hook(record(name)) for name in hidden]
        with _threads(torch, self.threads):
            try:
                with _eval_mode(self.module), torch.enable_grad():
                    y = self.module(xt)
            finally:
                for h in handles:
                    h.remove()
            if any(seen[k][0]._version != v for k, v in versions.items()):
                self._clone = True  # a recorded output was changed in place later on: again, with copies
                return self.compute(x, targets, pad_to)
            acts, grads, pred = self._gradients(xt, y, [seen.get(name, []) for name in hidden], targets)
        return acts, grads, pred[:n]

    def _gradients(self, xt, y, outputs: list, targets):
        """d y[t] / d (input, hidden outputs) by autograd; every array in the stored layout."""
        torch = self._torch
        hidden = self._hidden
        for name, outs in zip(hidden, outputs):
            _check_output(name, outs, self.source)
        pred = y.detach().argmax(dim=1)
        if targets is None:
            chosen = pred
        else:
            t = torch.from_numpy(np.asarray(targets, dtype=np.int64))
            chosen = torch.where(t < 0, pred, t)
        picked = y.gather(1, chosen[:, None]).sum()
        wrt = [xt, *(outs[0] for outs in outputs)]
        need = [i for i, w in enumerate(wrt) if w.requires_grad]
        got = (torch.autograd.grad(picked, [wrt[i] for i in need], allow_unused=True)
               if need and picked.requires_grad else [None] * len(need))
        grads = [None] * len(wrt)
        for i, g in zip(need, got):
            grads[i] = g
        grads = [torch.zeros_like(w) if g is None else g for w, g in zip(wrt, grads)]
        acts = [stored(a) for a in (xt, *wrt[1:], y)]
        return acts, [stored(g) for g in grads], pred.numpy().astype(np.int64)


def stored(t) -> np.ndarray:
    """A torch array as the store holds it: float32, axis 1 moved last when the rank is >= 3."""
    import torch

    t = t.detach()
    if t.dtype != torch.float32:
        t = t.float()
    if t.ndim >= 3:
        t = t.movedim(1, -1).contiguous()
    return t.numpy()


def _check_output(name: str, outputs: list, source: ModelSource) -> None:
    """Refuse a chosen module that was not called, was called more than once, or returns no single tensor."""
    import torch

    if not outputs:
        raise ModelError(f"layer {name!r} of {source.describe()} is not called in the model's forward "
                         "pass, so it has no activations; pick a module that is used.")
    if len(outputs) > 1:
        raise ModelError(f"layer {name!r} of {source.describe()} is used more than once in the forward "
                         f"pass ({len(outputs)} calls); inntrospect records one output per layer and "
                         "sample: pick another layer, or give each use a module of its own.")
    out = outputs[0]
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"layer {name!r} of {source.describe()} returns a {type(out).__name__}, not a "
                         "single tensor; pick a layer with one output tensor.")
    if out.ndim < 2:
        raise ModelError(f"layer {name!r} of {source.describe()} returns shape {tuple(out.shape)}; a "
                         "layer's output needs a batch axis and at least one unit axis.")


@contextlib.contextmanager
def _threads(torch, n: int):
    """torch's intra-op threads set to ``n`` for the duration."""
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def _eval_mode(module):
    """``module.eval()`` for the duration, then every submodule's own mode back."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _build(source: ModelSource, torch):
    """The module of ``source``: the object itself, or the factory's model with its weights loaded."""
    if source.module is not None:
        if not isinstance(source.module, torch.nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got a {type(source.module).__name__}.")
        return source.module
    if source.factory is None:
        raise ModelError(f"{source.describe()} is not a torch model.")
    fn = _factory(source)
    try:
        module = fn()
    except Exception as err:  # noqa: BLE001 - the user's code
        raise source.error(f"the torch factory {source.factory} raised {type(err).__name__}: {err}") from err
    if not isinstance(module, torch.nn.Module):
        raise source.error(f"the torch factory {source.factory} returned a {type(module).__name__}, "
                           "not a torch.nn.Module; it must build and return the model.")
    if source.weights is not None:
        try:
            state = torch.load(source.weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling error
            raise source.error(
                f"could not read the weights file {source.weights} as a state_dict ({err}). Save it "
                "with torch.save(model.state_dict(), path); a whole pickled model is not read."
            ) from err
        if isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state.get("state_dict", state.get("model_state_dict", state))  # a checkpoint dict
        if not isinstance(state, Mapping):
            raise source.error(f"the weights file {source.weights} holds a {type(state).__name__}, not a "
                               "state_dict; save it with torch.save(model.state_dict(), path).")
        try:
            module.load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - missing or unexpected keys, wrong shapes
            raise source.error(f"the weights {source.weights} do not fit the model of "
                               f"{source.factory}: {err}") from err
    module.requires_grad_(False)  # our own copy: gradients are only taken for activations
    return module


def _factory(source: ModelSource):
    """The factory function of ``source``, imported from its module or file."""
    target, fn = source.factory.rsplit(":", 1)
    file = source.factory_file
    if file is not None:
        if not file.is_file():
            raise source.error(f"the factory file {file} does not exist (on this machine).")
        name = "inntrospect_torch_factory_" + hashlib.sha256(str(file).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, file)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # classes defined there (dataclasses, pickling) find their module
        try:
            spec.loader.exec_module(mod)
        except Exception as err:  # noqa: BLE001 - the user's code
            sys.modules.pop(name, None)
            raise source.error(f"importing the factory file {file} failed: {type(err).__name__}: {err}") from err
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as err:
            raise source.error(
                f"cannot import the module {target!r} of the torch factory {source.factory} ({err}). It "
                "must be importable here and on every worker (installed, or on PYTHONPATH); or give "
                "the file instead: 'path/to/file.py:function'."
            ) from err
    if not hasattr(mod, fn):
        have = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        raise source.error(f"the torch factory {source.factory}: {target} has no {fn!r}. Its functions "
                           f"and classes: {', '.join(have) or 'none'}.")
    func = getattr(mod, fn)
    if not callable(func):
        raise source.error(f"the torch factory {source.factory}: {fn!r} is a {type(func).__name__}, not "
                           "a function; give a function that takes no arguments and returns the model.")
    return func
