"""Entrypoint for `ray job submit -- python jobs/export.py ...` (and plain `python jobs/export.py`).

Kept thin on purpose: all logic lives in imgcls.export, which the tests call directly.
"""

import sys
from pathlib import Path

# Make the package importable from a checkout or a `ray job submit --working-dir` upload.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls.cli import process_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(process_main(["export", *sys.argv[1:]]))
