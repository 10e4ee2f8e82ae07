"""Reading throughput: the same images decoded through imgcls' Ray Data pipeline from an S3 bucket
versus from local disk, in one run, alternating (local, bucket) repetitions.

The bucket is moto's S3 server on 127.0.0.1 unless --endpoint points at a real S3-compatible store
(credentials then come from the usual AWS variables). Results: bench/results/read_throughput.json.

Usage: python bench/read_throughput.py [--data examples/data/digits/train] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).resolve().parent / "results"


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return server, endpoint
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("moto server did not start")


def upload(data: Path, endpoint: str, bucket: str) -> str:
    import boto3
    from concurrent.futures import ThreadPoolExecutor

    client = boto3.client("s3", endpoint_url=endpoint)
    existing = [entry["Name"] for entry in client.list_buckets().get("Buckets", [])]
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    files = [path for path in sorted(data.rglob("*")) if path.is_file()]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda path: client.upload_file(str(path), bucket, f"bench/{path.relative_to(data).as_posix()}"), files))
    return f"s3://{bucket}/bench"


def timed_read(uri: str, image_size: int, channels: int) -> dict[str, float]:
    from imgcls.data.datasets import decoded_dataset
    from imgcls.data.listing import list_images

    started = time.perf_counter()
    listing = list_images(uri)
    listed = time.perf_counter()
    rows = decoded_dataset(listing.paths, None, (image_size, image_size), channels, 10**8, 64).materialize().count()
    finished = time.perf_counter()
    return {
        "images": rows,
        "listing_seconds": listed - started,
        "seconds": finished - started,
        "images_per_second": rows / (finished - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="examples/data/digits/train")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--endpoint", default=None, help="An S3-compatible endpoint; default: start moto locally.")
    parser.add_argument("--bucket", default="imgcls-bench")
    arguments = parser.parse_args()
    server = None
    if arguments.endpoint:
        endpoint = arguments.endpoint
    else:
        server, endpoint = start_moto()
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    os.environ.setdefault("AWS_REGION", "us-east-1")
    try:
        import ray

        data = Path(arguments.data).resolve()
        bucket_uri = upload(data, endpoint, arguments.bucket)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        timed_read(str(data), arguments.image_size, arguments.channels)  # warm-up: worker processes, imports
        runs: dict[str, list[dict[str, float]]] = {"local": [], "bucket": []}
        for _ in range(arguments.repeats):
            runs["local"].append(timed_read(str(data), arguments.image_size, arguments.channels))
            runs["bucket"].append(timed_read(bucket_uri, arguments.image_size, arguments.channels))
        summary = {name: statistics.median(run["images_per_second"] for run in values) for name, values in runs.items()}
        result = {"endpoint": "moto (127.0.0.1)" if server else endpoint, "runs": runs, "median_images_per_second": summary,
                  "bucket_to_local_ratio": round(summary["bucket"] / summary["local"], 3)}  # fmt: skip
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "read_throughput.json").write_text(json.dumps(result, indent=2))
        print(f"local disk: {summary['local']:.0f} images/s, bucket: {summary['bucket']:.0f} images/s, "
              f"ratio {result['bucket_to_local_ratio']}")  # fmt: skip
    finally:
        if server:
            server.terminate()


if __name__ == "__main__":
    main()
