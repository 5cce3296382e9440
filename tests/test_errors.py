"""The exception hierarchy: one class per condition wherever it is found, built-ins kept."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import inntrospect
from inntrospect import errors
from inntrospect.errors import (
    GroupNotFoundError,
    InntrospectError,
    MissingDependencyError,
    NonFiniteError,
    ParameterError,
    ParameterTypeError,
)

PACKAGE = Path(inntrospect.__file__).parent


def test_every_error_is_an_inntrospect_error_and_a_builtin_exported_flat():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__]
    assert len(classes) > 10
    for cls in classes:
        assert issubclass(cls, InntrospectError), cls
        assert getattr(inntrospect, cls.__name__) is cls, f"{cls.__name__} not in inntrospect"
        assert cls.__name__ in inntrospect.__all__
        if cls is not InntrospectError:  # and a built-in, so `except ValueError` keeps working
            assert any(b.__module__ == "builtins" and b is not Exception for b in cls.__mro__), cls


@pytest.mark.parametrize(("cls", "builtins"), [
    (ParameterError, (ValueError,)),
    (ParameterTypeError, (TypeError, ValueError)),
    (MissingDependencyError, (ImportError,)),
])
def test_new_classes_keep_the_builtin_they_replace(cls, builtins):
    assert issubclass(cls, InntrospectError)
    for b in builtins:
        assert issubclass(cls, b)
    with pytest.raises(builtins[0]):
        raise cls("what was expected, what came, what to do")


def nan_nap():
    nap = np.random.default_rng(0).random((3, 2, 2, 20))
    nap[1, 0, 1, 7] = np.nan
    return nap


def test_a_non_finite_profile_is_the_same_error_in_layout_circle_and_images():
    from inntrospect.topomap.circle import distribute_in_circle
    from inntrospect.topomap.images import interpolate, unit_values
    from inntrospect.topomap.layout import Layout, profile_matrix

    nap = nan_nap()
    xy = np.random.default_rng(1).random((20, 2))
    calls = {
        "profile_matrix": lambda: profile_matrix(nap),
        "Layout.fit": lambda: Layout("random").fit(np.moveaxis(nap, -1, 0).reshape(20, -1)),
        "interpolate": lambda: interpolate(xy, unit_values(nap), resolution=8),
        "distribute_in_circle": lambda: distribute_in_circle(np.where(np.arange(40).reshape(20, 2) == 5,
                                                                      np.inf, xy)),
    }
    for name, call in calls.items():
        with pytest.raises(NonFiniteError) as err:
            call()
        assert type(err.value) is NonFiniteError, name
        assert isinstance(err.value, ValueError), name  # as before
        assert "NaN" in str(err.value), name


def test_bad_arguments_raise_parameter_errors(tmp_path):
    from inntrospect.analysis.projection import choose_samples
    from inntrospect.topomap.circle import distribute_in_circle
    from inntrospect.topomap.images import interpolate
    from inntrospect.topomap.layout import Layout, profile_matrix
    from inntrospect.topomap.quality import topographic_quality
    from inntrospect.viz import plots

    xy = np.random.default_rng(1).random((20, 2))
    calls = {
        "unknown layout method": lambda: Layout("umop").fit(np.ones((20, 3))),
        "unknown metric": lambda: Layout("pca", "manhattan").fit(np.ones((20, 3))),
        "NAP of one axis": lambda: profile_matrix(np.ones(5)),
        "unknown circle method": lambda: distribute_in_circle(xy, method="fast"),
        "negative steps": lambda: distribute_in_circle(xy, n_steps=-1),
        "values of the wrong shape": lambda: interpolate(xy, np.ones((2, 19))),
        "images of the wrong shape": lambda: topographic_quality(np.ones(5)),
        "unknown format": lambda: plots.plot_topomaps({}, tmp_path, format="jpg"),
        "unknown mode": lambda: plots.plot_topomaps({}, tmp_path, mode="grid"),
        "nothing to draw": lambda: plots.overview_figure({}),
        "unknown sampling": lambda: choose_samples(np.array(["a", "b"]), 1, "last"),
        "no samples": lambda: choose_samples(np.array(["a", "b"]), 0),
        "nothing to stack": lambda: inntrospect.stack({}),
    }
    for name, call in calls.items():
        with pytest.raises(ParameterError) as err:
            call()
        assert isinstance(err.value, ValueError), name
    with pytest.raises(ParameterTypeError, match="store path or a mapping") as err:
        plots.plot_topomaps(42, tmp_path)
    assert isinstance(err.value, TypeError)


def test_an_unknown_group_in_a_topomap_display_is_a_group_error():
    from inntrospect.viz.plots import TopomapDisplay

    d = TopomapDisplay(np.zeros((2, 4, 4)), (0, 1, 0, 1), ["a", "b"], "dense")
    with pytest.raises(GroupNotFoundError, match="not in the topomaps of layer 'dense'"):
        d.plot(groups=["c"])


#: the built-in raises left on purpose, per module (every other raise names an InntrospectError)
LEFT = {
    "topomap/circle.py": {"NotImplementedError": "stubs that numba replaces before any call"},
    "analysis/projection.py": {"OSError": "the scratch file (our own temporary file) ended early: "
                                          "a disk fault, not an input"},
    "extraction/corpus.py": {"IndexError": "Corpus.read out of bounds: extraction computes them"},
    "__init__.py": {"AttributeError": "what a module's __getattr__ must raise"},
    "store/backends.py": {"FileNotFoundError": "Location.move on object storage with nothing to "
                                               "move, as os.replace raises on a local folder: an "
                                               "internal invariant of swapping results in"},
}
CHECKED = {str(p.relative_to(PACKAGE)): LEFT.get(str(p.relative_to(PACKAGE)), {})
           for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(CHECKED))
def test_modules_raise_only_inntrospect_errors(module):
    """Every ``raise X(...)`` there names an InntrospectError, or a built-in left on purpose."""
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id[:1].isupper():
                found.append((exc.id, node.lineno))
    for name, line in found:
        cls = getattr(errors, name, None)
        if cls is not None and issubclass(cls, InntrospectError):
            continue
        assert name in CHECKED[module], f"{module}:{line} raises a bare {name}; raise an " \
                                        f"InntrospectError subclass (see inntrospect/errors.py)"
