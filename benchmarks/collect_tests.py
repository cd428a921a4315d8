"""Collects (does not run) several pytest selections in one process, for the GPU session's dry run: a selection
that stops matching any test, or whose modules stop importing, fails here instead of on a lent GPU. The session's
plugin (_pytest_fixed_tiles, beside this file) is loaded as on the GPU.

    python benchmarks/collect_tests.py "tests/ops/test_infonce.py -k 'not distributed'" "tests/ops/test_crop_resize.py"
"""

from __future__ import annotations

import shlex
import sys

import pytest


class Count:
    def __init__(self):
        self.items = 0

    def pytest_collection_finish(self, session):
        self.items = len(session.items)


def main(selections: list[str]) -> int:
    failed = 0
    for selection in selections:
        count = Count()
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "_pytest_fixed_tiles",
                            *shlex.split(selection)], plugins=[count])
        print(f"selection {selection!r}: {count.items} tests, exit {int(code)}", flush=True)
        failed += code != 0 or count.items == 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
