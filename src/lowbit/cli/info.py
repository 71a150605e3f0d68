"""`lowbit info`: a checkpoint's recipe, per-layer formats, size and provenance."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    i = sub.add_parser("info", help="recipe, per-layer formats, size and provenance of a checkpoint")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true", help="hash every file and check it against the manifest "
                   "(loading trusts a file unchanged since it was last hashed)")
    i.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from lowbit.checkpoint import Manifest, verify_checkpoint
    from lowbit.eval.report import info_text, per_layer_summary

    if args.verify:  # every byte hashed now, whatever the stamps from earlier loads say
        manifest = verify_checkpoint(args.checkpoint)
        print(f"verified: {len(manifest.files)} files match the sizes and sha256 in the manifest, and no "
              "other file is there; the config and tensor headers agree with it", file=sys.stderr)
    else:
        manifest = Manifest.read(args.checkpoint)
    if args.json:
        print(json.dumps({**per_layer_summary(manifest), **manifest.to_dict()}, indent=2))
    else:
        print(info_text(manifest))
    return 0
