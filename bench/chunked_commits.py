"""What chunked commits cost: the same bulk run, as a whole `python jobs/predict.py` process from
start to exit, committing its rows in one chunk (the default chunk of 100,000 images is larger than
the run) against chunks of 2,000 and 500 images (10 and 40 commits: far more often than the default
would on any input), on the same JPEGs and artifact as bench/predict_throughput.py. Runs are
interleaved, each size `--repeats` times, and the medians compared. Local output (one directory
rename per chunk) by default; `--s3` writes to a moto server on 127.0.0.1 instead (file-by-file
copies per chunk). Results: bench/results/chunked_commits.json.

Usage: python bench/chunked_commits.py [--images 20000] [--repeats 3] [--s3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY / "bench"))
sys.path.insert(0, str(REPOSITORY))

from predict_throughput import RESULTS, WORK, make_artifact, make_images  # noqa: E402

CHUNK_SIZES = (100_000, 2_000, 500)


def start_moto() -> tuple[subprocess.Popen, str]:
    import socket
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")  # fmt: skip
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    return server, endpoint


def one_run(folder: Path, artifact: str, output: str, chunk: int) -> tuple[float, int]:
    if not output.startswith("s3://"):
        shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, str(REPOSITORY / "jobs" / "predict.py"), "--model", artifact, "--input", str(folder),
               "--output", output, "--set", f"commit_every_images={chunk}"]  # fmt: skip
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    started = time.perf_counter()
    finished = subprocess.run(command, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(finished.stderr[-3000:])
    from imgcls.platform import output_runs, storage

    location = storage.resolve(output)
    (record_file,) = [path for path in storage.iter_files(location.join(output_runs.RUNS))]
    record = json.loads(storage.read_bytes(location.join(output_runs.RUNS, record_file)))
    return seconds, len(record["chunks"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action="store_true")
    arguments = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    folder = WORK / f"jpegs_{arguments.images}"  # exactly this run's images
    make_images(folder, arguments.images, 640, 480)
    artifact = make_artifact()
    server = None
    if arguments.s3:
        server, _ = start_moto()
    seconds: dict[int, list[float]] = {chunk: [] for chunk in CHUNK_SIZES}
    commits: dict[int, int] = {}
    try:
        for repeat in range(arguments.repeats):
            for chunk in CHUNK_SIZES:
                output = f"s3://bench/chunks-{chunk}-{repeat}" if arguments.s3 else str(WORK / f"out_chunks_{chunk}")
                took, commits[chunk] = one_run(folder, artifact, output, chunk)
                seconds[chunk].append(took)
                print(f"repeat {repeat}: chunks of {chunk}: {took:.1f} s ({commits[chunk]} commits)", flush=True)
    finally:
        if server is not None:
            server.terminate()
    baseline = statistics.median(seconds[CHUNK_SIZES[0]])
    results = {
        "images": arguments.images,
        "output": "s3 (moto)" if arguments.s3 else "local",
        "runs": {
            str(chunk): {"commits": commits[chunk], "seconds": seconds[chunk], "median_seconds": statistics.median(seconds[chunk]),
                         "images_per_second": arguments.images / statistics.median(seconds[chunk]),
                         "cost_vs_one_chunk": statistics.median(seconds[chunk]) / baseline - 1}  # fmt: skip
            for chunk in CHUNK_SIZES
        },
    }
    name = "chunked_commits_s3.json" if arguments.s3 else "chunked_commits.json"
    (RESULTS / name).write_text(json.dumps(results, indent=2))
    for chunk in CHUNK_SIZES:
        run = results["runs"][str(chunk)]
        print(f"chunks of {chunk:>7}: {run['commits']:>3} commits, median {run['median_seconds']:.1f} s, "
              f"{run['images_per_second']:.0f} images/s, {100 * run['cost_vs_one_chunk']:+.1f}% against one chunk")  # fmt: skip


if __name__ == "__main__":
    main()
