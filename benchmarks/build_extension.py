"""Builds the extension mmfuse_fast._C in place from setup.py (its sources, flags and arch list), with ninja compiling
the sources in parallel (MAX_JOBS, default every core) where ninja is installed; setup.py alone builds them one
after another. For a GPU session, which has minutes to spare, not tens of them.

    python benchmarks/build_extension.py            # build in place
    python benchmarks/build_extension.py --check    # only check that setup.py's build would use ninja (no compile)
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def force_ninja() -> bool:
    """Makes every BuildExtension.with_options(...) build with ninja; False when ninja is not installed."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return False
    original = cpp_extension.BuildExtension.with_options
    cpp_extension.BuildExtension.with_options = classmethod(
        lambda cls, **options: original(**{**options, "use_ninja": True}))
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="check the ninja hook without compiling")
    args = parser.parse_args(argv)
    ninja = force_ninja()
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    if args.check:
        from setuptools import Distribution
        from torch.utils import cpp_extension

        uses_ninja = cpp_extension.BuildExtension.with_options(use_ninja=False)(Distribution()).use_ninja
        print(f"ninja installed: {ninja}; setup.py's build would use ninja: {uses_ninja}")
        return 0 if uses_ninja == ninja else 1
    print(f"building mmfuse_fast._C with {'ninja, MAX_JOBS=' + os.environ['MAX_JOBS'] if ninja else 'setuptools'}",
          flush=True)
    os.chdir(ROOT)
    sys.argv = ["setup.py", "-q", "build_ext", "--inplace"]
    runpy.run_path("setup.py", run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
