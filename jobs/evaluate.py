"""Entrypoint for `ray job submit -- python jobs/evaluate.py ...` (and plain `python jobs/evaluate.py`).

Kept thin on purpose: all logic lives in imgcls.evaluate, which the tests call directly.
"""

import sys
from pathlib import Path

# Make the package importable from a checkout or a `ray job submit --working-dir` upload.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls.cli import process_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(process_main(["evaluate", *sys.argv[1:]]))
