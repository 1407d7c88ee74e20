"""`quantbench ARGV` in a child process that stops at a chosen point, so a test can signal or
kill it there (tests/test_reliability_kill.py). Not a test module.

    python reliability_driver.py pause READY RECIPE ARGV...  # waits inside RECIPE, after its work,
                                                              # before its row is written
    python reliability_driver.py cut READY RECIPE ARGV...    # writes the first half of RECIPE's row
                                                              # to rows.jsonl, then waits (for kill -9)

READY is written (with the PID) when the point is reached.
"""
import json
import os
import sys
import time
from pathlib import Path

from quantbench import cli
from quantbench.core import fileio
from quantbench.run import cell, rundir


def _ready(path: str) -> None:
    Path(path).write_text(str(os.getpid()))
    time.sleep(900)  # until the test signals or kills this process


def main() -> None:
    mode, ready, at, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    if mode == "pause":
        real = cell._run_recipe

        def run_recipe(model, recipe, *a, **k):
            row = real(model, recipe, *a, **k)
            if recipe.name == at:
                _ready(ready)
            return row

        cell._run_recipe = run_recipe
    elif mode == "cut":
        real_append = fileio.RowStore.append

        def append(self, row):
            if row["recipe"] == at:
                line = (json.dumps(row, default=str) + "\n").encode()
                with open(self.path, "ab") as f:
                    f.write(line[: len(line) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                _ready(ready)
            real_append(self, row)

        fileio.RowStore.append = append
    cli.main(argv)


if __name__ == "__main__":
    main()
