"""Topomap layout end to end: the reference recipe vs ours, on the MNIST CNN's flatten layer.

What is compared
----------------
Input: the contrastive NAPs (``REFERENCE.md`` §5, equal weights) of the 4,608
units of the MNIST CNN's ``flatten_8`` layer, from the 10,000 MNIST test
images grouped by true label (10 groups): ``C_g = NAP_g - mean_h NAP_h``, a
``(group, unit)`` matrix. Computed once with ``tf_keras`` from the real model
and data in ``../shared`` (beside the checkout) and cached in
``benchmarks/results/contrast_flatten_8.npy``; ``--source FILE.npy`` passes any
``(group, unit)`` contrast matrix instead. The profiles are
``profile_matrix(C)`` (unit, group), the unit values ``unit_values(C)``.

Rows, each: layout s, circle s, images s (the unit values interpolated onto a
100 x 100 grid), total, speed-up of the total against (a), and the
topographic quality (§9, ``blur_mean`` / ``resize_mean``, lower = smoother) of
the images, with and without the circle step:

(a) the reference recipe: ``umap.UMAP()`` with its defaults (no
    ``random_state``: parallel, not reproducible), min-max,
    :func:`distribute_reference` (the plain numpy transcription of §6 step 5;
    the min-max after it is inside it), images by ``scipy.interpolate.griddata``
    once per group (the reference's way; checked equal to ours);
(b) ours: ``Layout("umap", seed=0).fit(P)`` + ``distribute_in_circle(xy,
    seed=0)`` (``method="auto"``: the compiled exact kernel below 6,000 units) +
    :func:`interpolate`;
(c) ours with the other methods (pca, som, graph, tsne, random), for context.

Then the circle step alone:

- compiled exact vs numpy on the same input (the reference's UMAP layout, same
  jitter seed), results compared (target: >= 30x);
- ``method="approx"`` (particle-mesh) on 25,000 units (ours UMAP layout tiled
  with a little noise), its time and its displacement from the exact kernel
  (exact takes ~70 s there: ``--skip-exact-25k``).

Compilation is **excluded** from the table and reported separately: the circle
kernels are compiled (or loaded from numba's cache) and UMAP / pynndescent are
JIT-warmed on random inputs of the same size class (>= 4096 rows, UMAP's
nearest-neighbour-descent path) before anything is timed. UMAP's layout
optimisation still compiles nothing per call (its kernels are module-level).

Run::

    python benchmarks/bench_layout.py            # about 5 min idle (up to 15 loaded): UMAP's JIT warm-up 1-2 min, the numpy reference
                                                 # 2-3 min, graph layout 2-3.5 min, exact on 25k 1-2 min
    python benchmarks/bench_layout.py --quick    # 300 synthetic units, no model, PCA standing in for
                                                 # UMAP, no tsne, approx on 1,000 units; ~10-20 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "mnist_cnn_shallow"
IMAGES = SHARED / "data" / "mnist" / "t10k-images-idx3-ubyte.gz"
LABELS = SHARED / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz"
LAYER = "flatten_8"
CACHE = ROOT / "benchmarks" / "results" / f"contrast_{LAYER}.npy"
RESOLUTION = 100
OTHER_METHODS = ("pca", "som", "graph", "tsne", "random")


# -- input ------------------------------------------------------------------------
def contrast_from_model() -> np.ndarray:
    """Contrastive NAPs ``(10, 4608)`` of ``flatten_8`` over the 10k MNIST test images (needs TensorFlow)."""
    import tf_keras

    sys.path.insert(0, str(ROOT / "examples" / "mnist"))
    from make_corpus import read_idx

    x = (read_idx(IMAGES).astype(np.float32) / 255.0)[..., None]
    y = read_idx(LABELS).astype(np.int64)
    model = tf_keras.models.load_model(str(MODEL), compile=False)
    sub = tf_keras.Model(model.inputs, model.get_layer(LAYER).output)
    acts = sub.predict(x, batch_size=500, verbose=0).reshape(len(x), -1)
    groups = np.unique(y)  # sorted: digits 0..9
    nap = np.stack([acts[y == g].mean(axis=0, dtype=np.float64) for g in groups])
    return nap - nap.mean(axis=0)  # REFERENCE.md §5, equal weights


def get_contrast(source: Path | None) -> tuple[np.ndarray, str]:
    if source is not None:
        c = np.load(source)
        return np.asarray(c, dtype=np.float64), f"{source} (--source)"
    if CACHE.exists():
        return np.load(CACHE), f"{CACHE} (cached)"
    print(f"{CACHE} not found: computing {LAYER} activations of the 10k MNIST test images ...", flush=True)
    t0 = time.perf_counter()
    c = contrast_from_model()
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    np.save(CACHE, c)
    return c, f"{CACHE} (computed in {time.perf_counter() - t0:.0f} s and cached)"


def synthetic_contrast(n: int, groups: int = 10, seed: int = 0) -> np.ndarray:
    """A ``(group, unit)`` contrast with topographic structure: each group a bump over hidden 2-D unit positions."""
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2))
    centres = rng.random((groups, 2))
    d2 = ((pos[None, :, :] - centres[:, None, :]) ** 2).sum(-1)
    v = np.exp(-d2 / (2 * 0.15**2)) + 0.05 * rng.standard_normal((groups, n))
    v = np.maximum(v, 0)  # ReLU-like
    return v - v.mean(axis=0)


# -- helpers ----------------------------------------------------------------------
def clock(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median_time(repeats, fn, *args, **kwargs):
    ts, out = [], None
    for _ in range(repeats):
        t, out = clock(fn, *args, **kwargs)
        ts.append(t)
    return statistics.median(ts), out


def reference_layout(method: str, P: np.ndarray) -> np.ndarray:
    """The reference's layout call: ``umap.UMAP()`` with its defaults (sklearn's ``PCA(2)`` with --quick)."""
    import warnings

    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(2).fit_transform(P)
    import umap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return umap.UMAP().fit_transform(P)


def griddata_images(xy, values, resolution=RESOLUTION):
    """The reference's images: ``scipy.interpolate.griddata`` once per group (NaN outside the hull)."""
    from scipy.interpolate import griddata

    from inntrospect.topomap.images import grid

    gx, gy = grid(xy, resolution)
    return np.stack([griddata(xy, v, (gx, gy), method="linear", fill_value=np.nan) for v in values])


def quality(xy, values):
    from inntrospect.topomap.images import interpolate
    from inntrospect.topomap.quality import topographic_quality

    q = topographic_quality(interpolate(xy, values, resolution=RESOLUTION))
    assert np.isfinite(q.blur_mean) and np.isfinite(q.resize_mean)
    return q.blur_mean, q.resize_mean


def displacement(a, b):
    d = np.hypot(*(np.asarray(a) - np.asarray(b)).T)
    return float(d.max()), float(np.median(d))


def warm_up(n_rows: int, features: int, umap_too: bool = True) -> dict:
    """Compile / load the circle kernels and JIT-warm UMAP on a random input; seconds of each."""
    from inntrospect.topomap import circle
    from inntrospect.topomap.layout import Layout

    t = {}
    t["circle kernels (numba, compiled or loaded from cache)"], _ = clock(circle.compiled_kernels)
    x = np.random.default_rng(1).standard_normal((n_rows, features))
    if umap_too:
        t[f"UMAP() on {n_rows} random rows (JIT warm-up, incl. pynndescent)"], _ = clock(
            reference_layout, "umap", x)
        t[f"Layout('umap', seed=0) on {n_rows} random rows (JIT warm-up)"], _ = clock(
            Layout("umap", seed=0).fit, x)
    t["distribute_in_circle exact + approx on 200 units (first calls)"], _ = clock(
        lambda: (circle.distribute_in_circle(x[:200, :2], seed=0, method="exact"),
                 circle.distribute_in_circle(x[:200, :2], seed=0, method="approx")))
    t["first calls of PCA, griddata, interpolate, quality on 200 units (imports)"], _ = clock(
        lambda: (reference_layout("pca", x[:200]), griddata_images(x[:200, :2], x[:200, 2:4].T),
                 quality(x[:200, :2], x[:200, 2:4].T)))
    return t


# -- main -------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None, help="a (group, unit) contrast matrix (.npy)")
    ap.add_argument("--quick", action="store_true",
                    help="300 synthetic units (or --source's first 300), PCA standing in for UMAP, "
                         "no tsne, approx on 1,000 units: seconds, checks kept")
    ap.add_argument("--umap", action="store_true",
                    help="with --quick: UMAP in (a) and (b) all the same (its JIT warm-up alone takes 20-40 s)")
    ap.add_argument("--skip-exact-25k", action="store_true",
                    help="no exact run on the large layout (~70 s): approx's time only, no displacement")
    ap.add_argument("--large", type=int, default=25_000, help="units of the approx run (default 25,000)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the circle-alone timings (median)")
    ap.add_argument("--methods", default=None,
                    help=f"the other methods of (c) (default {','.join(OTHER_METHODS)}; --quick: no tsne)")
    a = ap.parse_args(argv)
    # (a) and (b) use UMAP; --quick stands PCA in for it (UMAP's first-call JIT compilation, 20-40 s,
    # would be most of the test's time), unless --umap
    main_method = "pca" if a.quick and not a.umap else "umap"
    if a.methods is None:
        a.methods = ",".join(m for m in OTHER_METHODS if not (a.quick and m == "tsne"))
    others = [m for m in a.methods.split(",") if m and m != main_method]

    from inntrospect.topomap import circle
    from inntrospect.topomap.circle import distribute_in_circle, distribute_reference
    from inntrospect.topomap.images import interpolate, unit_values
    from inntrospect.topomap.layout import Layout, minmax, profile_matrix

    load0 = os.getloadavg()[0]
    if a.quick:
        n_quick = 300
        if a.source is not None:
            c, desc = get_contrast(a.source)
            c, desc = c[:, :n_quick], desc + f", first {n_quick} units"
        else:
            c, desc = synthetic_contrast(n_quick), f"synthetic, {n_quick} units (--quick)"
        a.large, a.repeats = min(a.large, 1000), 1
    else:
        c, desc = get_contrast(a.source)
    if c.ndim != 2:
        raise SystemExit(f"the contrast must be (group, unit); got shape {c.shape}")
    values = unit_values(c)  # (group, unit)
    P = profile_matrix(c)  # (unit, group), the reference's column filter
    n = P.shape[0]
    print(f"input: {desc}; contrast {c.shape} (group, unit); profiles {P.shape} after the column filter")

    warm = warm_up(4200 if n >= 4096 else n, P.shape[1], umap_too=main_method == "umap")
    print("\nwarm-up, NOT in the timings below:")
    for k, v in warm.items():
        print(f"  {k}: {v:.2f} s")

    rows = []

    def add(name, t_layout, xy0, t_circle, xy, t_images, images_check=None):
        assert xy.shape == (n, 2) and np.isfinite(xy).all()
        assert xy.min() >= -1e-12 and xy.max() <= 1 + 1e-12
        blur, resize = quality(xy, values)
        blur0, resize0 = quality(xy0, values)
        rows.append(dict(name=name, layout=t_layout, circle=t_circle, images=t_images,
                         total=t_layout + t_circle + t_images, blur=blur, resize=resize,
                         blur0=blur0, resize0=resize0))

    # (a) the reference recipe
    t_la, xy0_a = clock(lambda: minmax(reference_layout(main_method, P)))
    # seed=0 only fixes the jitter draws (1e-6), so that the compiled kernel can be compared below
    t_ca, xy_a = clock(distribute_reference, xy0_a, seed=0)
    t_ia, img_a = clock(griddata_images, xy_a, values)
    ours_img = interpolate(xy_a, values, resolution=RESOLUTION)
    np.testing.assert_array_equal(np.isnan(img_a), np.isnan(ours_img))
    np.testing.assert_allclose(img_a, ours_img, rtol=1e-12, atol=1e-15)
    ref_name = "UMAP()" if main_method == "umap" else "PCA(2) (--quick)"
    add(f"(a) reference: {ref_name} + numpy circle + griddata", t_la, xy0_a, t_ca, xy_a, t_ia)

    # (b) ours, (c) the other methods
    xy0_b = None
    for method in [main_method, *others]:
        t_l, xy0 = clock(lambda m=method: Layout(m, seed=0).fit(P).xy_)
        t_c, xy = clock(distribute_in_circle, xy0, seed=0)
        t_i, _ = clock(interpolate, xy, values, resolution=RESOLUTION)
        if method == main_method:
            xy0_b = xy0
            add(f"(b) ours: Layout('{method}') + circle (auto) + interpolate", t_l, xy0, t_c, xy, t_i)
        else:
            add(f"(c) ours: Layout('{method}') + circle + interpolate", t_l, xy0, t_c, xy, t_i)

    ta = rows[0]["total"]
    print(f"\n{n:,} units, {len(values)} groups, images {RESOLUTION} x {RESOLUTION}; quality = area under the "
          "error curve (REFERENCE.md §9), lower = smoother; 'no circle': the same layout before step 5")
    hdr = (f"{'method':<55} {'layout s':>9} {'circle s':>9} {'images s':>9} {'total s':>8} {'vs (a)':>7} "
           f"{'blur':>8} {'resize':>8} {'blur no circ':>12} {'resize no c':>11}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['name']:<55} {r['layout']:>9.2f} {r['circle']:>9.2f} {r['images']:>9.3f} {r['total']:>8.2f} "
              f"{ta / r['total']:>6.1f}x {r['blur']:>8.4f} {r['resize']:>8.4f} {r['blur0']:>12.4f} "
              f"{r['resize0']:>11.4f}")

    # the circle step alone: compiled exact vs numpy, same input, same jitter seed
    print(f"\ncircle step alone (100 steps) on the same input: (a)'s layout before step 5, {n:,} units")
    t_ex, ex = median_time(a.repeats, distribute_in_circle, xy0_a, seed=0, method="exact")
    t_auto, auto = median_time(a.repeats, distribute_in_circle, xy0_a, seed=0)
    diff = float(np.abs(ex - xy_a).max())
    assert diff < 1e-6, f"compiled exact differs from the numpy reference by {diff}"
    ratio = t_ca / t_ex
    print(f"  numpy distribute_reference           {t_ca:>8.2f} s   1.0x")
    print(f"  compiled exact (median of {a.repeats})         {t_ex:>8.2f} s   {ratio:.1f}x   "
          f"max |exact - numpy| = {diff:.1e}   (target >= 30x at 4,608 units: {'met' if ratio >= 30 else 'NOT met'})")
    print(f"  method='auto' (-> {'approx' if n >= circle.AUTO_THRESHOLD else 'exact'})"
          f"{'':<14}{t_auto:>8.2f} s   {t_ca / t_auto:.1f}x   "
          f"max |auto - numpy| = {np.abs(auto - xy_a).max():.1e}")

    # approx on a large layout: ours UMAP layout tiled with a little noise
    rng = np.random.default_rng(2)
    big = xy0_b[rng.integers(0, n, a.large)] + 0.01 * rng.standard_normal((a.large, 2))
    big = minmax(big)
    print(f"\ncircle step on {a.large:,} units ((b)'s layout tiled, + N(0, 0.01) noise, min-max scaled)")
    t_ap, ap_ = median_time(a.repeats, distribute_in_circle, big, seed=0, method="approx")
    if a.skip_exact_25k:
        print(f"  approx (particle-mesh, grid {circle.APPROX_GRID})  {t_ap:>8.2f} s   (exact skipped: "
              "--skip-exact-25k)")
    else:
        t_bex, bex = clock(distribute_in_circle, big, seed=0, method="exact")
        emax, emed = displacement(ap_, bex)
        assert emax < 5e-3, f"approx is {emax} away from exact"
        print(f"  exact (numba)                        {t_bex:>8.2f} s   1.0x")
        print(f"  approx (particle-mesh, grid {circle.APPROX_GRID})      {t_ap:>8.2f} s   {t_bex / t_ap:.1f}x   "
              f"displacement vs exact, max / median: {emax:.1e} / {emed:.1e} (of the [0, 1] square)")
    print(f"\nload average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
          "UMAP() in (a) (no random_state) runs on all cores, Layout('umap', seed=0) on one (seeded)")


if __name__ == "__main__":
    main()
