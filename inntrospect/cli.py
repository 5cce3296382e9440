"""The ``inntrospect`` command. Imports stay inside the subcommands, so ``--help`` is fast."""

from __future__ import annotations

import argparse
import functools
import sys

from . import registry
from .errors import InntrospectError


def _cmd_extract(args) -> int:
    from . import store as st
    from .config import load_config
    from .extraction.local import prepare_extraction, run_extraction
    from .extraction.prepare import estimate_ratio, keep_store_plan

    cfg = load_config(args.config)
    ex = prepare_extraction(**cfg.extract_kwargs(verify_corpus=args.verify_corpus))
    if args.append and args.overwrite:
        from .errors import ConfigError

        raise ConfigError("--append adds the corpus's new rows to the store, --overwrite deletes it first: "
                          "give one of them.")
    before = None
    if not args.overwrite and st.is_store(ex.path):
        stored = st.store_attrs(ex.path)
        ex = keep_store_plan(ex, stored)  # what the run writes: the store's chunks
        before = (stored.get("corpus") or {}).get("n_samples")
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
                                      where="cluster", verify=args.verify, on_damaged=_print_damaged,
                                      append=args.append)
    else:
        computed = run_extraction(ex, overwrite=args.overwrite, progress=not args.no_progress,
                                  verify=args.verify, on_damaged=_print_damaged, append=args.append)
    skipped = ex.n_blocks - len(computed)
    note = f" ({skipped} finished blocks kept from an earlier run)" if skipped else ""
    print(f"extracted {len(computed)} of {ex.n_blocks} blocks into {ex.path}{note}")
    if args.append and before is not None and before < ex.corpus.n_samples:
        print(f"appended {ex.corpus.n_samples - before} samples: the store holds {before} before, "
              f"{ex.corpus.n_samples} now (derived results are stale; inntrospect naps CONFIG updates "
              "the NAPs from the new samples alone)")
    return 0


def _print_damaged(blocks: list[int], n_blocks: int) -> None:
    """What ``extract`` found damaged in an existing store (and is about to extract again)."""
    shown = ", ".join(map(str, blocks[:20])) + (", ..." if len(blocks) > 20 else "")
    print(f"found {len(blocks)} of {n_blocks} recorded blocks damaged (missing or failing chunks): "
          f"{shown}; extracting them again")


def _cmd_steps(command: str, args) -> int:
    """A step command: its steps from the registry, in order, each printing what it did."""
    from .config import load_config

    cfg = load_config(args.config)
    path = cfg.store_path()
    results = {}
    for step in registry.commands()[command]:
        results[step.name] = step.run(cfg, path, not args.no_progress)
        if step.summary is not None:
            print(step.summary(cfg, results))
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


def _cmd_run(args) -> int:
    from .pipeline import run

    run(args.config, from_step=args.from_step, force=args.force, append=args.append,
        scheduler=args.scheduler, progress=not args.no_progress)
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


def _store_argument(text: str):
    """A store path or URL as given, or the store a config file names (with its storage_options)."""
    from pathlib import Path

    if Path(text).suffix in (".toml", ".json") and Path(text).is_file():
        from .config import load_config

        return load_config(text).store_path()
    return text


def _cmd_info(args) -> int:
    from .store.info import describe_store

    print(describe_store(_store_argument(args.store)))
    return 0


def _cmd_verify(args) -> int:
    from .store.integrity import verify

    store = _store_argument(args.store)
    if args.scheduler:  # the chunks are read on that cluster's workers
        from distributed import Client

        with Client(args.scheduler):
            report = verify(store, progress=not args.no_progress)
    else:
        report = verify(store, progress=not args.no_progress)
    print(report)
    return 0 if report.ok else 1


def _cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, progress=not args.no_progress)
    return 0


def _extract_options(e: argparse.ArgumentParser) -> None:
    e.add_argument("config", help="TOML config with [model], [corpus], [store], [extract]")
    e.add_argument("--dry-run", action="store_true",
                   help="print samples, layers, shapes and sizes, write nothing")
    e.add_argument("--overwrite", action="store_true", help="delete an existing store and start over")
    e.add_argument("--append", action="store_true", help="the corpus has new rows after those extracted, "
                   "or a second corpus file listed after the store's in [corpus] path = [\"jan.csv\", "
                   "\"feb.csv\"]: extract only their samples into the store (the rows extracted must be "
                   "unchanged)")
    e.add_argument("--verify", action="store_true", help="also read every chunk of the recorded blocks "
                   "and extract again those that fail their checksum (missing chunks always are)")
    e.add_argument("--verify-corpus", action="store_true", help="record (and on resume compare) "
                   "each batch file's sha256, not only its size and time ([extract] verify_corpus)")
    _last_options(e, _cmd_extract, "compute the blocks on this dask.distributed scheduler's workers "
                  "(default: [cluster] address, else in this process)")


def _last_options(c: argparse.ArgumentParser, func, scheduler: str | None = None,
                  progress: str = "no progress bar") -> None:
    """A command's ``--scheduler`` (when it takes one) and ``--no-progress``, and what it runs."""
    if scheduler is not None:
        c.add_argument("--scheduler", metavar="ADDRESS", help=scheduler)
    c.add_argument("--no-progress", action="store_true", help=progress)
    c.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="inntrospect",
        description="What a deep network has learned, per layer and group of inputs, out of core.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for command, steps in registry.commands().items():
        c = sub.add_parser(command, help=steps[0].help)
        if command == "extract":
            _extract_options(c)
            continue
        c.add_argument("config", help="TOML config naming the store ([store] path)")
        _last_options(c, functools.partial(_cmd_steps, command))

    c = sub.add_parser("compare-layouts",
                       help="quality and runtime of several layout methods per layer, as a table and CSV")
    c.add_argument("config", help="TOML config naming the store ([store] path)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--methods", help="comma-separated methods (default: [topomap] compare, "
                   "else all: umap,tsne,pca,som,graph,random)")
    c.set_defaults(func=_cmd_compare)

    r = sub.add_parser("run", help="the whole pipeline, skipping steps whose results are current")
    r.add_argument("config", help="TOML config with every section the steps need")
    r.add_argument("--from", dest="from_step", metavar="STEP",
                   help=f"redo this step and all after it: {', '.join(registry.STEPS)}")
    r.add_argument("--force", action="store_true", help="redo every step, the extraction included")
    r.add_argument("--append", action="store_true", help="the corpus has new rows or csv files after "
                   "those extracted: extract only their samples, update the NAPs from them, redo the rest")
    _last_options(r, _cmd_run, "a running dask.distributed scheduler (default: [cluster] address, "
                  "else an in-process cluster)", progress="no progress bars")

    g = sub.add_parser("import-legacy", help="import the reference toolbox's output folder into a store")
    g.add_argument("folder", help="folder with acts/layerNNN/*.npy, grads/…, group_name_to_files.json, …")
    g.add_argument("store", help="path of the Zarr store to write")
    g.add_argument("--layer-names", metavar="JSON",
                   help='layer names: {"layer000": "conv2d", …} or ["conv2d", …] (default: layerNNN)')
    g.add_argument("--chunk-mib", type=float, help="target chunk size in MiB (default 32)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    _last_options(g, _cmd_import_legacy)

    i = sub.add_parser("info", help="what a store holds: layers, shapes, groups, sizes, steps, state")
    i.add_argument("store", help="path or URL of the Zarr store, or a config naming it (with its "
                   "storage_options)")
    i.set_defaults(func=_cmd_info)

    v = sub.add_parser("verify", help="read every chunk of a store and check it: present, decoding, "
                       "checksum; exits 1 when any is damaged")
    v.add_argument("store", help="path or URL of the Zarr store, or a config naming it (with its "
                   "storage_options)")
    _last_options(v, _cmd_verify, "read the chunks on this dask.distributed scheduler's workers")

    d = sub.add_parser("demo", help="train a small CNN on scikit-learn's digits and run every step")
    d.add_argument("--out", default="storage/demo", help="output folder (default: storage/demo)")
    _last_options(d, _cmd_demo)
    return p


def console() -> int:
    """The ``inntrospect`` command (and ``python -m inntrospect``): :func:`main`, then an exit that
    does not walk the command's objects.

    At exit Python collects the cycles among every object left, those of the
    ~1,300 modules a command imports included: 0.17 s of a 0.9 s command here.
    The process ends anyway and the operating system takes its memory back at
    once, so the objects are frozen out of the collector first (finalizers
    still run as references drop; only garbage cycles are not searched for).
    """
    import gc

    code = main()
    gc.freeze()
    return code


def main(argv: list[str] | None = None) -> int:
    import gc

    # a command imports ~1,300 modules lazily: with Python's default thresholds the cycle collector
    # runs through them ~100 ms per command; collections a hundred times rarer cost nothing here
    threshold = gc.get_threshold()
    gc.set_threshold(max(threshold[0], 70_000), *threshold[1:])
    try:
        return _main(argv)
    finally:
        gc.set_threshold(*threshold)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InntrospectError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a fault met outside the store's own guards: still one line
        from .store.faults import translate

        mapped = translate(err, getattr(err, "filename", None) or "a file")
        print(f"error: {mapped or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
