"""Run the ``mtrun`` command line in a fresh process with the tests' isolated plugin set.

``python tests/mtrun_isolated.py embed MODEL ...`` is ``mtrun embed MODEL ...`` with core's
builtins and the testkit registered (the testkit is not installed as an entry point). With
``MTRUN_TEST_ENCODE_DELAY=SECONDS`` every encoder batch sleeps that long first, so a test can
kill ``mtrun embed`` part-way through a library.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
for path in (TESTS / "testkit" / "src", TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def main() -> int:
    import mtrun.plugins
    from test_recipe_validation import isolated_plugins

    plugin_set = isolated_plugins()
    mtrun.plugins.get_plugins = lambda: plugin_set
    delay = float(os.environ.get("MTRUN_TEST_ENCODE_DELAY", "0") or 0)
    if delay:
        from mtrun.inference.model import Model

        encode = Model.encode_windows

        def slow_encode(self, windows):
            time.sleep(delay)
            return encode(self, windows)

        Model.encode_windows = slow_encode
    from mtrun.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
