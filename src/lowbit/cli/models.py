"""`lowbit models`, `lowbit kernels` and `lowbit recipes`: what is there to work with."""

from __future__ import annotations

import json

from lowbit.cli.common import _mb, common_arguments


def register(sub) -> None:
    m = sub.add_parser("models", help="list known models and whether they are present locally")
    m.add_argument("--fetch", nargs="+", metavar="NAME", help="fetch these known models into the cache")
    m.add_argument("--json", action="store_true")
    common_arguments(m, data=False)
    m.set_defaults(func=cmd_models)

    kn = sub.add_parser("kernels", help="build lowbit's native CPU kernels now (otherwise built on first use) and say which load")
    common_arguments(kn, data=False)
    kn.set_defaults(func=cmd_kernels)

    rp = sub.add_parser("recipes", help="list the built-in recipe presets (use with quantize --recipe NAME)")
    rp.add_argument("--long", dest="verbose_recipes", action="store_true", help="also show each resolved recipe")
    rp.set_defaults(func=cmd_recipes)


def cmd_models(args) -> int:
    from lowbit.models import KNOWN_MODELS, fetch_known_model, is_present
    from lowbit.models.fetch import known_model_path

    if args.fetch:
        for name in args.fetch:
            path = fetch_known_model(name, cache=args.cache)
            print(f"{name}: {path}")
        return 0
    rows = []
    for name, m in KNOWN_MODELS.items():
        present = is_present(name, cache=args.cache)
        rows.append({"name": name, "architecture": m.architecture, "params": m.params, "file": m.filename,
                     "bytes": m.size_bytes, "present": present,
                     "path": str(known_model_path(name, cache=args.cache)) if present else None})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("name", "arch", "params", "size", "present")]
    table += [(r["name"], r["architecture"], r["params"], _mb(r["bytes"]), r["path"] if r["present"] else "no")
              for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:  # columns two spaces apart, each as wide as its widest cell; size right-aligned
        cells = [c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  ".join([*cells, row[-1]]))
    if not all(r["present"] for r in rows):
        print("\nmodels not present are fetched on first use, or now with: lowbit models --fetch NAME")
    return 0


def cmd_kernels(args) -> int:
    from lowbit import kernels

    failed = 0
    for name in kernels.NAMES:
        try:
            kernels.load(name, cache=args.cache)
            print(f"{name}: ready")
        except kernels.KernelUnavailable as e:
            failed += 1
            print(f"{name}: unavailable, the torch reference is used ({e})")
    return 1 if failed else 0


def cmd_recipes(args) -> int:
    from lowbit.recipes import PRESET_DIR, Recipe, presets

    for name in presets():
        path = PRESET_DIR / f"{name}.toml"
        about = " ".join(line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#"))
        if args.verbose_recipes:
            print(f"{name}: {about}\n  {Recipe.from_file(path).describe()}; file {path}")
        else:
            print(f"{name:<18} {about}")
    return 0
