"""Bulk prediction throughput and memory: imgcls against (a) a hand-written single-process loop
(Pillow decode + batched model.predict) and (b) a tf.data pipeline (parallel decode_image +
model.predict), on the same JPEGs and the same artifact (the tutorial CNN at 64x64x3), in one run,
at two sizes (2k and 20k images by default), plus peak memory (RSS summed over the driver and every
Ray process but idle workers) of imgcls at both sizes.

Ray is started before the clock starts, as on a running cluster, and every imgcls run waits until
the cluster is idle again. imgcls runs with its defaults (placement auto): this Ray is one 2-CPU
machine, so both sizes run in the job's process (decoding on threads, the model there; no Ray tasks);
at 20k the run holds the cluster's CPUs through Ray. For the record, both sizes also run with Ray
Data and the actor pool forced (placement actor_pool), whose times include starting the pool and
loading the model (TensorFlow's import in each fresh actor process). The baselines run in this
process, where TensorFlow is already imported; each contender also runs as its own job (a fresh
process joining this Ray). 64-image imgcls runs measure the fixed start-up cost of both paths, and
the pool's steady-state rate is (20k - 2k images) / (time at 20k - time at 2k), both with the pool.
The small size runs `--small-repeats` times per contender, interleaved, and the median counts.
Results: bench/results/predict_throughput.json.

Usage: python bench/predict_throughput.py [--images 2000] [--large 20000] [--width 640 --height 480]
       [--small-repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = Path(__file__).resolve().parent / "results"
WORK = RESULTS / "predict_work"
IMAGE_SIZE = (64, 64)


def make_images(folder: Path, count: int, width: int, height: int) -> list[str]:
    """Smooth random photos-like JPEGs (gradients plus noise), written once and reused."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    existing = sorted(str(path) for path in folder.glob("*.jpg"))
    if len(existing) >= count:
        return existing[:count]
    generator = np.random.default_rng(0)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    for index in range(len(existing), count):
        noise = generator.normal(0, 20, (height // 8, width // 8, 3)).repeat(8, 0).repeat(8, 1)
        pixels = np.clip(base * generator.uniform(0.3, 1.0, 3) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:06d}.jpg", quality=85)
    return sorted(str(path) for path in folder.glob("*.jpg"))[:count]


def make_artifact() -> str:
    from imgcls.modeling.artifact import save_artifact
    from imgcls.config import ModelConfig
    from imgcls.modeling.models import create_model

    destination = WORK / "artifact"
    if not (destination / "metadata.json").exists():
        model = create_model(ModelConfig(), IMAGE_SIZE, 3, 2)
        save_artifact(model, {"class_names": ["a", "b"], "image_size": IMAGE_SIZE, "channels": 3, "task": "binary",
                              "model_name": "seed_cnn"}, str(destination))  # fmt: skip
    return str(destination)


def hand_loop(paths: list[str], artifact: str, batch_size: int = 64) -> float:
    """(a) What one writes without a framework: open, convert, resize, batch, predict."""
    import numpy as np
    from PIL import Image

    from imgcls.modeling.artifact import load_artifact

    started = time.perf_counter()
    model, _ = load_artifact(artifact)
    batch = []
    for path in paths:
        with Image.open(path) as image:
            batch.append(np.asarray(image.convert("RGB").resize(IMAGE_SIZE[::-1], Image.Resampling.BILINEAR)))
        if len(batch) == batch_size:
            model.predict_on_batch(np.stack(batch).astype(np.float32))
            batch = []
    if batch:
        model.predict_on_batch(np.stack(batch).astype(np.float32))
    return len(paths) / (time.perf_counter() - started)


def tf_data_pipeline(paths: list[str], artifact: str, batch_size: int = 64) -> float:
    """(b) tf.data with parallel decode_image and resize, then model.predict."""
    import tensorflow as tf

    from imgcls.modeling.artifact import load_artifact

    started = time.perf_counter()
    model, _ = load_artifact(artifact)

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, IMAGE_SIZE)

    dataset = tf.data.Dataset.from_tensor_slices(paths).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    model.predict(dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE), verbose=0)
    return len(paths) / (time.perf_counter() - started)


def cluster_rss() -> int:
    """RSS of this process and every Ray process on the machine, in bytes, except idle Ray workers
    (`ray::IDLE`): those are left over from earlier runs (Ray keeps up to one per CPU alive), and
    counting them charged a run in this process with the worker processes of the pool run before it."""
    import psutil

    total = 0
    for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        command = " ".join(process.info["cmdline"] or [])
        if command.startswith("ray::IDLE"):
            continue
        if process.info["pid"] == os.getpid() or "ray" in command:
            total += process.info["memory_info"].rss if process.info["memory_info"] else 0
    return total


def busy_ray_workers() -> list[str]:
    """Worker processes of an imgcls run still working or exiting: Ray titles them after their task or
    actor (`ray::MapBatches(decode_batch)`, `ray::MapWorker(MapBatches(Predictor))`). Idle workers,
    Ray's agents and Ray Data's own long-lived actors are not a run's."""
    import psutil

    busy = []
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or [])
        if title.startswith("ray::") and ("MapBatches" in title or "MapWorker" in title):
            busy.append(title.split()[0])
    return busy


def wait_until_idle(timeout: float = 30.0) -> None:
    """A nightly job starts on an idle cluster: wait for the last run's actors to give back their CPUs
    and for their processes to exit (a model actor that outlived its CPUs counted as the next run's memory)."""
    import ray

    deadline = time.monotonic() + timeout
    while (
        ray.available_resources().get("CPU", 0.0) < ray.cluster_resources().get("CPU", 0.0) - 1e-6
        or busy_ray_workers()
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Ray cluster did not become idle: {busy_ray_workers()}")
        time.sleep(0.2)
    time.sleep(1.0)


def imgcls_run(folder: Path, artifact: str, name: str, **settings) -> dict[str, float]:
    from imgcls import predict
    from imgcls.config import PredictConfig

    output = WORK / f"out_{name}"
    shutil.rmtree(output, ignore_errors=True)
    wait_until_idle()
    peak = [cluster_rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(cluster_rss())
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = predict.run(PredictConfig(model=artifact, input=str(folder), output=str(output), **settings))
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"images": summary.images_listed, "images_per_second": summary.images_listed / seconds,
            "seconds": seconds, "peak_rss_bytes": max(peak)}  # fmt: skip


def imgcls_job(folder: Path, artifact: str, name: str) -> float:
    """imgcls as a nightly job runs it: `python jobs/predict.py` joining the running cluster."""
    import ray

    output = WORK / f"out_job_{name}"
    shutil.rmtree(output, ignore_errors=True)
    wait_until_idle()
    environment = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, str(REPOSITORY / "jobs" / "predict.py"), "--model", artifact, "--input", str(folder),
               "--output", str(output)]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True, capture_output=True)
    return len(list(folder.glob("*.jpg"))) / (time.perf_counter() - started)


def baseline_job(kind: str, paths: list[str], artifact: str) -> float:
    """A baseline as its own job: a fresh Python process, imports and model load included."""
    paths_file = WORK / "baseline_paths.txt"
    paths_file.write_text("\n".join(paths))
    command = [sys.executable, __file__, "--baseline", kind, "--paths-file", str(paths_file), "--artifact", artifact]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return len(paths) / (time.perf_counter() - started)


def median_run(runs: list):
    """The median of rates, or of imgcls runs by their rate (the middle one of an odd count)."""
    ordered = sorted(runs, key=lambda run: run["images_per_second"] if isinstance(run, dict) else run)
    return ordered[len(ordered) // 2]


def linked_subset(all_paths: list[str], name: str, count: int) -> tuple[Path, list[str]]:
    folder = WORK / name
    if not folder.exists() or len(list(folder.glob("*.jpg"))) != count:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for path in all_paths[:count]:
            os.link(path, folder / Path(path).name)
    return folder, sorted(str(path) for path in folder.glob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--small-repeats", type=int, default=3, help="runs of each contender at the small size (median)")
    parser.add_argument("--baseline", choices=["hand_loop", "tf_data"], help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.baseline:  # one baseline as its own process (see baseline_job)
        paths = Path(arguments.paths_file).read_text().split("\n")
        {"hand_loop": hand_loop, "tf_data": tf_data_pipeline}[arguments.baseline](paths, arguments.artifact)
        return
    import logging

    from imgcls.platform.logs import configure_logging

    configure_logging(logging.WARNING)
    all_paths = make_images(WORK / "images_all", arguments.large, arguments.width, arguments.height)
    tiny, _ = linked_subset(all_paths, "images_tiny", 64)
    small, small_paths = linked_subset(all_paths, "images_small", arguments.images)
    large, large_paths = linked_subset(all_paths, "images_large", arguments.large)
    artifact = make_artifact()

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {"jpeg_size": [arguments.width, arguments.height], "cpus": os.cpu_count()}
    imgcls_run(small, artifact, "warmup", placement="actor_pool")  # worker processes and imports, as on a warm cluster
    results["imgcls_start_up_seconds"] = {
        "in_process": imgcls_run(tiny, artifact, "tiny")["seconds"],
        "actor_pool": imgcls_run(tiny, artifact, "tiny_pool", placement="actor_pool")["seconds"],
    }
    sizes = {"small": (small, small_paths), "large": (large, large_paths)}
    for size, (folder, paths) in sizes.items():
        # A 2k run lasts 2-10 s, where one noisy second moves a rate by half: every contender runs
        # `--small-repeats` times, interleaved, and the median run counts. 20k runs once.
        repeats = arguments.small_repeats if size == "small" else 1
        rounds = []
        for _ in range(repeats):
            rounds.append({"imgcls": imgcls_run(folder, artifact, size),
                           "imgcls_actor_pool": imgcls_run(folder, artifact, size + "_pool", placement="actor_pool"),
                           "hand_loop": hand_loop(paths, artifact), "tf_data": tf_data_pipeline(paths, artifact),
                           "job_imgcls": imgcls_job(folder, artifact, size),
                           "job_hand_loop": baseline_job("hand_loop", paths, artifact),
                           "job_tf_data": baseline_job("tf_data", paths, artifact)})  # fmt: skip

        def median(name: str):
            return median_run([entry[name] for entry in rounds])

        def imgcls_median(name: str) -> dict:
            # Memory: the lowest peak of the rounds (the conservative side of the large/small ratio).
            runs = [entry[name] for entry in rounds]
            return {**median_run(runs), "peak_rss_bytes": min(run["peak_rss_bytes"] for run in runs)}

        entry = {"images": len(paths), "repeats": repeats, "imgcls": imgcls_median("imgcls"),
                 "hand_loop_images_per_second": median("hand_loop"), "tf_data_images_per_second": median("tf_data"),
                 "all_rounds": rounds}  # fmt: skip
        entry["imgcls_actor_pool"] = imgcls_median("imgcls_actor_pool")
        entry["imgcls_actor_pool_vs_tf_data"] = round(
            entry["imgcls_actor_pool"]["images_per_second"] / entry["tf_data_images_per_second"], 3
        )
        rate = entry["imgcls"]["images_per_second"]
        entry["imgcls_vs_hand_loop"] = round(rate / entry["hand_loop_images_per_second"], 3)
        entry["imgcls_vs_tf_data"] = round(rate / entry["tf_data_images_per_second"], 3)
        jobs = {"imgcls": median("job_imgcls"), "hand_loop": median("job_hand_loop"), "tf_data": median("job_tf_data")}
        jobs["imgcls_vs_hand_loop"] = round(jobs["imgcls"] / jobs["hand_loop"], 3)
        jobs["imgcls_vs_tf_data"] = round(jobs["imgcls"] / jobs["tf_data"], 3)
        entry["as_separate_jobs_images_per_second"] = jobs
        results[size] = entry
    small_pool, large_pool = results["small"]["imgcls_actor_pool"], results["large"]["imgcls_actor_pool"]
    results["imgcls_steady_state_images_per_second"] = round(
        (large_pool["images"] - small_pool["images"]) / (large_pool["seconds"] - small_pool["seconds"]), 1
    )
    # Memory as the input grows: with the defaults (here both sizes in the job's process), and with
    # the actor pool at both sizes.
    results["large_vs_small_peak_rss"] = round(
        results["large"]["imgcls"]["peak_rss_bytes"] / results["small"]["imgcls"]["peak_rss_bytes"], 3
    )
    results["large_vs_small_peak_rss_actor_pool"] = round(large_pool["peak_rss_bytes"] / small_pool["peak_rss_bytes"], 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "predict_throughput.json").write_text(json.dumps(results, indent=2))
    print("images  imgcls img/s  hand loop img/s  tf.data img/s  vs hand loop  vs tf.data  peak RSS MiB")
    for size in sizes:
        entry = results[size]
        print(f"{entry['images']:6d}  {entry['imgcls']['images_per_second']:12.0f}  "
              f"{entry['hand_loop_images_per_second']:15.0f}  {entry['tf_data_images_per_second']:13.0f}  "
              f"{entry['imgcls_vs_hand_loop']:11.2f}x  {entry['imgcls_vs_tf_data']:9.2f}x  "
              f"{entry['imgcls']['peak_rss_bytes'] / 2**20:12.0f}")  # fmt: skip
    print("as separate jobs (each a fresh process: imports, Ray connection, model load included):")
    for size in sizes:
        jobs = results[size]["as_separate_jobs_images_per_second"]
        print(f"{results[size]['images']:6d}  {jobs['imgcls']:12.0f}  {jobs['hand_loop']:15.0f}  {jobs['tf_data']:13.0f}  "
              f"{jobs['imgcls_vs_hand_loop']:11.2f}x  {jobs['imgcls_vs_tf_data']:9.2f}x")  # fmt: skip
    start_up = results["imgcls_start_up_seconds"]
    for size in sizes:
        pool = results[size]["imgcls_actor_pool"]
        print(f"{results[size]['images']} images with the actor pool forced: {pool['images_per_second']:.0f} images/s "
              f"({results[size]['imgcls_actor_pool_vs_tf_data']:.2f}x tf.data), peak RSS {pool['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"peak RSS large/small: {results['large_vs_small_peak_rss']:.2f}x with the defaults, "
          f"{results['large_vs_small_peak_rss_actor_pool']:.2f}x with the actor pool at both sizes")
    print(f"imgcls start-up (64 images): in the job's process {start_up['in_process']:.1f} s, actor pool "
          f"{start_up['actor_pool']:.1f} s; pool steady state {results['imgcls_steady_state_images_per_second']:.0f} images/s")


if __name__ == "__main__":
    main()
