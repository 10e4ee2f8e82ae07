"""Drift monitoring on the digits example (`make data`, and the demo's model runs/digits/model,
trained here when missing), in one run:

1. False alarms: the held-out test folder's images are classified once (the real Predictor, with
   its monitoring columns); then `--resamples` random halves of them (and smaller runs) each go
   through the run monitor and the drift test, as a bulk run of those images would. The share
   flagged is the false-alarm rate (target: at most the configured 1%).
2. Detection: whole bulk runs (imgcls.predict in this process) on in-distribution and on shifted
   inputs made from the test folder: colour-inverted, another image domain (crops of
   scikit-learn's two bundled photographs), only two of the ten classes, darker, blurred, rotated.
3. Cost: `python jobs/predict.py` as its own process on `--throughput-images` images with
   monitoring on (the default) and off (`--set monitoring=false`), alternated `--repeats` times:
   whole-process seconds, in-loop images/s, and the monitor's own seconds in the run record.

Results: bench/results/drift_monitoring.json.

Usage: python bench/drift_monitoring.py [--resamples 300] [--throughput-images 20000] [--repeats 3]
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
sys.path.insert(0, str(REPOSITORY))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

RESULTS = REPOSITORY / "bench" / "results"
WORK = RESULTS / "drift_work"
MODEL = REPOSITORY / "runs" / "digits" / "model"
TEST_FOLDER = REPOSITORY / "examples" / "data" / "digits" / "test"


def ensure_model() -> None:
    if not (MODEL / "metadata.json").exists() or not (MODEL / "profile.json").exists():
        subprocess.run([sys.executable, "jobs/train.py", "--config", "examples/configs/digits.yaml"], cwd=REPOSITORY, check=True)


def test_images() -> tuple[list[str], list[str]]:
    paths, labels = [], []
    for folder in sorted(TEST_FOLDER.iterdir()):
        for path in sorted(folder.glob("*.png")):
            paths.append(str(path))
            labels.append(folder.name)
    return paths, labels


def observed_table(paths: list[str]):
    """Every test image's prediction row with the monitoring columns, from the real Predictor."""
    import pyarrow as pa

    from imgcls.config import PredictConfig
    from imgcls.inference.in_process import decoded_on_threads
    from imgcls.inference.predictor import Predictor, decode_arguments, predictor_arguments
    from imgcls.modeling.artifact import read_metadata

    config = PredictConfig(model=str(MODEL), input=str(TEST_FOLDER), output=str(WORK / "unused"))
    metadata = read_metadata(str(MODEL))
    predictor = Predictor(**predictor_arguments(config, 5, None))
    return pa.concat_tables([predictor(block) for block in decoded_on_threads(paths, 2, decode_arguments(config, metadata))])


def false_alarms(table, class_names: list[str], resamples: int) -> dict:
    import numpy as np

    from imgcls.monitoring.profile import read_profile
    from imgcls.monitoring.run_monitor import RunMonitor

    reference = read_profile(str(MODEL))
    generator = np.random.default_rng(0)
    results = {}
    for size in (table.num_rows // 2, 150, 100):
        flagged, scores, signals = 0, [], {}
        for _ in range(resamples):
            rows = table.take(np.sort(generator.choice(table.num_rows, size=size, replace=False)))
            monitor = RunMonitor(class_names, reference, None)
            monitor.observe(rows)
            report = monitor.drift()
            flagged += report.detected
            scores.append(report.score)
            for name, signal in report.signals.items():
                signals[name] = signals.get(name, 0) + signal.detected
        rate = flagged / resamples
        # Wilson score interval, 95%.
        z = 1.96
        centre = (rate + z * z / (2 * resamples)) / (1 + z * z / resamples)
        half = z * ((rate * (1 - rate) / resamples + z * z / (4 * resamples**2)) ** 0.5) / (1 + z * z / resamples)
        results[str(size)] = {"resamples": resamples, "flagged": flagged, "false_alarm_rate": rate,
                              "wilson_95": [round(max(0.0, centre - half), 4), round(centre + half, 4)],
                              "median_score": round(statistics.median(scores), 3), "flags_per_signal": signals}  # fmt: skip
        print(f"false alarms, runs of {size} images: {flagged}/{resamples} = {rate:.3f}")
    return results


def shifted_inputs(paths: list[str], labels: list[str]) -> dict[str, list[str]]:
    import numpy as np
    from PIL import Image, ImageFilter, ImageOps
    from sklearn.datasets import load_sample_images

    made: dict[str, list[str]] = {}

    def write(kind: str, images) -> None:
        folder = WORK / "inputs" / kind.replace(" ", "_")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        made[kind] = []
        for index, image in enumerate(images):
            target = folder / f"{index:05d}.png"
            image.save(target)
            made[kind].append(str(target))

    originals = [Image.open(path).convert("L") for path in paths]
    generator = np.random.default_rng(1)
    made["in distribution (half)"] = sorted(generator.choice(paths, size=len(paths) // 2, replace=False).tolist())
    write("inverted colours", [ImageOps.invert(image) for image in originals])
    photos = [Image.fromarray(photo).convert("L") for photo in load_sample_images().images]
    crops = []
    for index in range(len(paths)):
        photo = photos[index % 2]
        left, top = int(generator.integers(0, photo.width - 96)), int(generator.integers(0, photo.height - 96))
        crops.append(photo.crop((left, top, left + 96, top + 96)).resize((32, 32), Image.Resampling.BILINEAR))
    write("another domain (photo crops)", crops)
    made["two of ten classes"] = [path for path, label in zip(paths, labels) if label in ("3", "7")]
    write("darker (x0.7)", [image.point(lambda value: int(value * 0.7)) for image in originals])
    write("blurred (radius 1)", [image.filter(ImageFilter.GaussianBlur(1)) for image in originals])
    write("rotated 20 degrees", [image.rotate(20, resample=Image.Resampling.BILINEAR) for image in originals])
    return made


def detection(paths: list[str], labels: list[str]) -> list[dict]:
    from imgcls import predict
    from imgcls.config import PredictConfig

    rows = []
    for kind, images in shifted_inputs(paths, labels).items():
        manifest = WORK / "manifest.csv"
        manifest.write_text("path\n" + "".join(f"{path}\n" for path in images))
        output = WORK / "outputs" / kind.replace(" ", "_")
        shutil.rmtree(output, ignore_errors=True)
        # The test folder holds about 36 images per class: the two-class input is under the default
        # minimum of 100, so that one run is tested from 50.
        minimum = 50 if kind == "two of ten classes" else 100
        summary = predict.run(PredictConfig(model=str(MODEL), input=str(manifest), output=str(output), placement="driver",
                                            drift_min_images=minimum))  # fmt: skip
        drift = summary.drift
        flagged = sorted(name for name, signal in drift.signals.items() if signal.detected)
        rows.append({"input": kind, "images": drift.images, "min_images": minimum, "status": drift.status,
                     "drift_score": drift.score, "detected": drift.detected,
                     "signals_flagged": flagged,
                     "signal_values": {name: [signal.value, signal.threshold] for name, signal in drift.signals.items()}})  # fmt: skip
        score = "n/a" if drift.score is None else f"{drift.score:.2f}"
        print(f"{kind:32s} {drift.images:5d} images  score {score:>7s}  {drift.status:20s} {', '.join(flagged)}")
    return rows


def big_folder(paths: list[str], count: int) -> Path:
    folder = WORK / f"throughput_{count}"
    if len(list(folder.glob("*.png"))) != count:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for index in range(count):
            os.link(paths[index % len(paths)], folder / f"{index:06d}.png")
    return folder


def cost(paths: list[str], count: int, repeats: int) -> dict:
    folder = big_folder(paths, count)
    runs: dict[str, list[dict]] = {"monitoring": [], "no monitoring": []}
    for _ in range(repeats):
        for kind, extra in (("monitoring", []), ("no monitoring", ["--set", "monitoring=false"])):
            output = WORK / "throughput_output"
            shutil.rmtree(output, ignore_errors=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "jobs/predict.py", "--model", str(MODEL), "--input", str(folder), "--output",
                            str(output), *extra], cwd=REPOSITORY, check=True, capture_output=True)  # fmt: skip
            seconds = time.perf_counter() - started
            (record,) = [json.loads(path.read_text()) for path in (output / "_runs").glob("*.json")]
            runs[kind].append({"process_seconds": round(seconds, 2), "images_per_second": record["images_per_second"],
                               "monitor_seconds": (record.get("monitoring") or {}).get("seconds")})  # fmt: skip
            print(f"{kind:14s} {seconds:6.2f} s whole process, {record['images_per_second']} images/s in the run")
    median = {kind: {key: statistics.median(run[key] for run in entries) for key in ("process_seconds", "images_per_second")}
              for kind, entries in runs.items()}  # fmt: skip
    monitor_seconds = statistics.median(run["monitor_seconds"] for run in runs["monitoring"])
    return {
        "images": count, "runs": runs, "median": median, "monitor_seconds_in_driver": monitor_seconds,
        "whole_process_ratio": round(median["monitoring"]["process_seconds"] / median["no monitoring"]["process_seconds"], 3),
        "throughput_ratio": round(median["monitoring"]["images_per_second"] / median["no monitoring"]["images_per_second"], 3),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resamples", type=int, default=300)
    parser.add_argument("--throughput-images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_model()
    from imgcls.modeling.artifact import read_metadata

    class_names = read_metadata(str(MODEL)).class_names
    paths, labels = test_images()
    results = {"model": str(MODEL.relative_to(REPOSITORY)), "test_images": len(paths)}
    results["false_alarms"] = false_alarms(observed_table(paths), class_names, arguments.resamples)
    results["detection"] = detection(paths, labels)
    results["cost"] = cost(paths, arguments.throughput_images, arguments.repeats)
    cost_result = results["cost"]
    print(f"cost: whole process x{cost_result['whole_process_ratio']}, in-loop throughput x{cost_result['throughput_ratio']}")
    (RESULTS / "drift_monitoring.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
