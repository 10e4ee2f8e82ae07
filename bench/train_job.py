"""A training job as a whole process, the way a user meets it, against the plain Keras script that
does the same work (bench/plain_keras_train.py), in the same run: the tutorial CNN on the digits
at 64x64 RGB, 10 epochs, batch 32, no validation. Each contender is a fresh process, timed from
its start to its exit; rounds alternate the order. Reports the whole-process ratio, the in-loop
ratio (median images/s of epochs 2..N) and imgcls's phases (its timings.json): Ray's start,
listing and decoding, the workers' start, the epochs, checkpoints, and the end.

Usage: python bench/train_job.py [--data examples/data/digits/train] [--rounds 3] [--epochs 10]
       [--repo PATH]  (the checkout whose jobs/train.py runs: another one measures a "before")
       [--set KEY=VALUE ...]  (more settings for the imgcls job)
Results: bench/results/train_job.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from job_process import run_training_job  # noqa: E402
RESULTS = HERE / "results"


def plain_keras(data: Path, output: Path, arguments) -> dict:
    command = [sys.executable, str(HERE / "plain_keras_train.py"), str(data), str(output),
               "--image-size", str(arguments.image_size), "--channels", "3", "--epochs", str(arguments.epochs),
               "--batch-size", str(arguments.batch_size)]  # fmt: skip
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "steady_images_per_second": statistics.median(report["epoch_images_per_second"][1:]),
            "until_first_epoch_s": report["until_first_epoch_s"], "accuracy": report["accuracy"]}  # fmt: skip


def imgcls_job(repo: Path, data: Path, output: Path, arguments) -> dict:
    settings = [f"data.train={data}", f"data.image_size=[{arguments.image_size}, {arguments.image_size}]",
                "data.channels=3", "data.val_fraction=0", f"train.epochs={arguments.epochs}",
                f"train.batch_size={arguments.batch_size}", f"output_dir={output}", *arguments.set]  # fmt: skip
    wall, completed = run_training_job(repo, settings)
    rates = []
    history = output / "history.csv"
    if history.exists():
        import csv

        with open(history) as handle:
            rates = [float(row["images_per_second"]) for row in csv.DictReader(handle)]
    timings = json.loads((output / "timings.json").read_text()) if (output / "timings.json").exists() else {}
    lines = len((completed.stdout + completed.stderr).splitlines())
    return {"wall_s": wall, "steady_images_per_second": statistics.median(rates[1:]) if len(rates) > 1 else None,
            "phases": timings, "log_lines": lines}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="examples/data/digits/train")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repo", default=str(HERE.parent))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="More settings for the imgcls job, e.g. train.deterministic=false")  # fmt: skip
    arguments = parser.parse_args()
    data, repo = Path(arguments.data).resolve(), Path(arguments.repo).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="imgcls-bench-train-"))
    rounds = []
    try:
        for round_number in range(arguments.rounds):
            contenders = [("plain", lambda: plain_keras(data, scratch / "plain", arguments)),
                          ("imgcls", lambda: imgcls_job(repo, data, scratch / f"imgcls{round_number}", arguments))]  # fmt: skip
            if round_number % 2:
                contenders.reverse()
            row = {name: run() for name, run in contenders}
            row["whole_process_ratio"] = row["imgcls"]["wall_s"] / row["plain"]["wall_s"]
            steady = row["imgcls"]["steady_images_per_second"]
            row["in_loop_ratio"] = steady / row["plain"]["steady_images_per_second"] if steady else None
            rounds.append(row)
            print(f"round {round_number + 1}: imgcls {row['imgcls']['wall_s']:.1f} s, plain Keras "
                  f"{row['plain']['wall_s']:.1f} s, whole process {row['whole_process_ratio']:.2f}x, in-loop "
                  f"{row['in_loop_ratio'] or float('nan'):.2f}x; phases {row['imgcls']['phases']}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    summary = {
        "repo": str(repo), "settings": arguments.set, "epochs": arguments.epochs, "image_size": arguments.image_size, "rounds": rounds,
        "median_whole_process_ratio": statistics.median(row["whole_process_ratio"] for row in rounds),
        "median_in_loop_ratio": statistics.median(row["in_loop_ratio"] for row in rounds if row["in_loop_ratio"]),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_job.json").write_text(json.dumps(summary, indent=2))
    print(f"median whole-process ratio {summary['median_whole_process_ratio']:.2f}x, "
          f"in-loop {summary['median_in_loop_ratio']:.2f}x -> {RESULTS / 'train_job.json'}")  # fmt: skip


if __name__ == "__main__":
    main()
