"""Entrypoint for `ray job submit -- python jobs/report.py ...` (and plain `python jobs/report.py`).

Kept thin on purpose: all logic lives in imgcls.report, which the tests call directly.
"""

import sys
from pathlib import Path

# Make the package importable from a checkout or a `ray job submit --working-dir` upload.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imgcls.cli import process_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(process_main(["report", *sys.argv[1:]]))
