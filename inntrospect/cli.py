"""The ``inntrospect`` command. Imports stay inside the subcommands, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import sys

from .errors import InntrospectError


def _cmd_extract(args) -> int:
    from .config import load_config
    from .extraction.local import estimate_ratio, prepare_extraction, run_extraction

    cfg = load_config(args.config)
    ex = prepare_extraction(**cfg.extract_kwargs())
    if args.dry_run:
        print(ex.summary(estimate_ratio(ex)))
        print("dry run: nothing written.")
        return 0
    print(ex.summary())
    address = args.scheduler or cfg.get("cluster", "address")
    if address:  # the blocks are computed on that cluster's workers
        from distributed import Client

        with Client(address) as client:
            print(f"dask: {address}; dashboard: {client.dashboard_link}")
            computed = run_extraction(ex, overwrite=args.overwrite, progress=not args.no_progress,
                                      where="cluster")
    else:
        computed = run_extraction(ex, overwrite=args.overwrite, progress=not args.no_progress)
    skipped = ex.n_blocks - len(computed)
    note = f" ({skipped} finished blocks kept from an earlier run)" if skipped else ""
    print(f"extracted {len(computed)} of {ex.n_blocks} blocks into {ex.path}{note}")
    return 0


def _cmd_align(args) -> int:
    from .analysis.alignment import align
    from .config import load_config

    path = load_config(args.config).store_path()
    done = align(path, persist=True, progress=not args.no_progress)
    print(f"aligned {len(done)} layers with spatial axes ({', '.join(done) or 'none'}) in {path}")
    return 0


def _cmd_naps(args) -> int:
    from .analysis.profiles import naps
    from .config import load_config

    cfg = load_config(args.config)
    kwargs = cfg.naps_kwargs()
    done = naps(cfg.store_path(), **kwargs, persist=True, progress=not args.no_progress)
    first = next(iter(done.values()))
    groups = ", ".join(f"{g} ({c})" for g, c in zip(first.group.values, first["count"].values))
    print(f"NAPs of {len(done)} layers ({'aligned' if kwargs['aligned'] else 'raw'} activations"
          f"{', with std' if kwargs['std'] else ''}) in {cfg.store_path()}/naps; groups: {groups}")
    return 0


def _cmd_contrast(args) -> int:
    from .analysis.profiles import contrastive_naps
    from .config import load_config

    cfg = load_config(args.config)
    done = contrastive_naps(cfg.store_path(), **cfg.contrast_kwargs(), persist=True,
                            progress=not args.no_progress)
    first = next(iter(done.values()))
    print(f"contrastive NAPs of {len(done)} layers for groups {', '.join(map(str, first.group.values))} "
          f"in {cfg.store_path()}/contrast")
    return 0


def _cmd_layout(args) -> int:
    from .config import load_config
    from .topomap.api import topomap_images, topomap_layout

    cfg = load_config(args.config)
    path, kwargs = cfg.store_path(), cfg.layout_kwargs()
    done = topomap_layout(path, **kwargs, progress=not args.no_progress)
    images = topomap_images(path, cfg.resolution(), progress=not args.no_progress)
    print(f"topomaps ({kwargs['method']} layout, {kwargs['metric']} distance, profiles from "
          f"{kwargs['source']}) in {path}/topomap:")
    for layer, ds in images.items():
        q, sec = ds.attrs["quality"], done[layer].attrs["seconds"]
        print(f"  {layer:<24} {ds.sizes['unit']:>6} units  quality blur {q['blur']:.4f} "
              f"resize {q['resize']:.5f}  layout {sec['layout']:.1f} s + circle {sec['circle']:.1f} s")
    return 0


def _cmd_compare(args) -> int:
    from .config import load_config
    from .topomap.api import compare_layouts

    cfg = load_config(args.config)
    kwargs = cfg.layout_kwargs()
    kwargs.pop("method")
    methods = args.methods.split(",") if args.methods else cfg.compare_methods()
    table = compare_layouts(cfg.store_path(), methods, **kwargs, resolution=cfg.resolution(),
                            progress=not args.no_progress)
    out = cfg.plot_output()
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "compare_layouts.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"(topographic quality: lower is smoother; saved as {out / 'compare_layouts.csv'})")
    return 0


def _cmd_project(args) -> int:
    from .analysis.projection import instance_projection
    from .config import load_config

    cfg = load_config(args.config)
    kwargs = cfg.projection_kwargs()
    done = instance_projection(cfg.store_path(), **kwargs, persist=True, progress=not args.no_progress)
    print(f"instance projections of {len(done)} layers ({kwargs['samples_per_group']} "
          f"{kwargs['sampling']} samples per group) in {cfg.store_path()}/projection")
    return 0


def _cmd_plot(args) -> int:
    from .config import load_config
    from .viz.plots import plot_all

    cfg = load_config(args.config)
    out = cfg.plot_output()
    files = plot_all(cfg.store_path(), out, cfg.get("plot", "mode", "row"), cfg.get("plot", "format", "png"))
    print(f"{len(files)} figures in {out}")
    return 0


def _cmd_report(args) -> int:
    from .config import load_config
    from .viz.reporting import report

    cfg = load_config(args.config)
    out = cfg.plot_output()
    csv = out / "compare_layouts.csv"
    index = report(cfg.store_path(), out / "report", config=cfg.path,
                   compare_csv=csv if csv.is_file() else None, progress=not args.no_progress)
    print(f"report: {index} (open it in a browser; the folder is self-contained)")
    return 0


def _cmd_run(args) -> int:
    from .pipeline import run

    run(args.config, from_step=args.from_step, force=args.force, scheduler=args.scheduler,
        progress=not args.no_progress)
    return 0


def _cmd_import_legacy(args) -> int:
    import json

    from .extraction.legacy import import_legacy
    from .store.info import describe_store

    names = json.loads(args.layer_names) if args.layer_names else None
    path = import_legacy(args.folder, args.store, names, chunk_mib=args.chunk_mib,
                         overwrite=args.overwrite, progress=not args.no_progress)
    print(describe_store(path))
    return 0


def _cmd_info(args) -> int:
    from pathlib import Path

    from .store.info import describe_store

    store = args.store
    if Path(store).suffix in (".toml", ".json") and Path(store).is_file():  # a config: its store
        from .config import load_config

        store = load_config(store).store_path()
    print(describe_store(store))
    return 0


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inntrospect",
        description="What a deep network has learned, per layer and group of inputs, out of core.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("extract", help="stream a corpus through a model into a Zarr store (resumes)")
    e.add_argument("config", help="TOML config with [model], [corpus], [store], [extract]")
    e.add_argument("--dry-run", action="store_true",
                   help="print samples, layers, shapes and sizes, write nothing")
    e.add_argument("--overwrite", action="store_true", help="delete an existing store and start over")
    e.add_argument("--scheduler", metavar="ADDRESS",
                   help="compute the blocks on this dask.distributed scheduler's workers (default: "
                        "[cluster] address, else in this process)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_extract)

    for name, func, text in (
        ("align", _cmd_align, "write gradient-aligned activations into the store"),
        ("naps", _cmd_naps, "neuron activation profiles: per-group mean activations ([naps])"),
        ("contrast", _cmd_contrast, "contrastive NAPs of the groups of interest ([contrast])"),
        ("layout", _cmd_layout, "topomap layouts and images of every layer ([topomap])"),
        ("project", _cmd_project, "2-D instance projections, a sample of each group ([projection])"),
        ("plot", _cmd_plot, "topomap, overview and projection figures ([plot])"),
        ("report", _cmd_report, "a self-contained HTML report of the store ([plot] output)"),
        ("compare-layouts", _cmd_compare,
         "quality and runtime of several layout methods per layer, as a table and CSV"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("config", help="TOML config naming the store ([store] path)")
        c.add_argument("--no-progress", action="store_true", help="no progress bar")
        if name == "compare-layouts":
            c.add_argument("--methods", help="comma-separated methods (default: [topomap] compare, "
                           "else all: umap,tsne,pca,som,graph,random)")
        c.set_defaults(func=func)

    r = sub.add_parser("run", help="the whole pipeline, skipping steps whose results are current")
    r.add_argument("config", help="TOML config with every section the steps need")
    r.add_argument("--from", dest="from_step", metavar="STEP",
                   help="redo this step and all after it: extract, align, naps, contrast, layout, "
                        "topomap, projection, plots, report")
    r.add_argument("--force", action="store_true", help="redo every step, the extraction included")
    r.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running dask.distributed scheduler (default: [cluster] address, "
                        "else an in-process cluster)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)

    g = sub.add_parser("import-legacy", help="import the reference toolbox's output folder into a store")
    g.add_argument("folder", help="folder with acts/layerNNN/*.npy, grads/…, group_name_to_files.json, …")
    g.add_argument("store", help="path of the Zarr store to write")
    g.add_argument("--layer-names", metavar="JSON",
                   help='layer names: {"layer000": "conv2d", …} or ["conv2d", …] (default: layerNNN)')
    g.add_argument("--chunk-mib", type=float, help="target chunk size in MiB (default 32)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=_cmd_import_legacy)

    i = sub.add_parser("info", help="what a store holds: layers, shapes, groups, sizes, steps, state")
    i.add_argument("store", help="path or URL of the Zarr store, or a config naming it (with its "
                   "storage_options)")
    i.set_defaults(func=_cmd_info)

    d = sub.add_parser("demo", help="train a small CNN on scikit-learn's digits and run every step")
    d.add_argument("--out", default="storage/demo", help="output folder (default: storage/demo)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InntrospectError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
