"""`imgcls export` as a whole process, per format, against the plain alternative in the same run: a
Python process that loads the .keras file and calls Keras' `model.export` on it directly (no output
check, no labels or metadata, LiteRT with Keras' default of flex operators allowed, SavedModel with
`model.export()`'s doubled weights). Each contender is a fresh process, timed from its start to its
exit; rounds alternate the order. Also reports the files' sizes per format for both.

The model: an artifact given with --model, or by default the tutorial CNN for the digits (32x32
greyscale, 10 classes) with fixed random weights, saved as an imgcls artifact in a scratch folder.

Usage: python bench/export_time.py [--model ARTIFACT] [--rounds 3] [--formats saved_model,onnx,litert]
       [--results bench/results/export.json]
Results: bench/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
KERAS_FORMATS = {"saved_model": "tf_saved_model", "onnx": "onnx", "litert": "litert"}
PLAIN_FILES = {"saved_model": "", "onnx": "model.onnx", "litert": "model.tflite"}

# The plain alternative, as a user without imgcls would write it. ONNX needs a model that was called.
PLAIN_EXPORT = """
import sys
import keras
import numpy as np
import imgcls.modeling.backbones  # registers CaffePreprocessing, as loading any imgcls model needs
model = keras.saving.load_model(sys.argv[1], compile=False, safe_mode=True)
model(np.zeros((1, *model.inputs[0].shape[1:]), dtype=np.float32))
model.export(sys.argv[2], format=sys.argv[3], verbose=False)
"""


def default_artifact(scratch: Path) -> str:
    sys.path.insert(0, str(REPO))
    import keras

    from imgcls.modeling.artifact import save_artifact
    from imgcls.modeling.models import create_seed_cnn

    keras.utils.set_random_seed(0)
    uri = str(scratch / "digits_model")
    fields = {"class_names": [str(digit) for digit in range(10)], "image_size": (32, 32), "channels": 1,
              "task": "multiclass", "model_name": "seed_cnn"}  # fmt: skip
    save_artifact(create_seed_cnn((32, 32), 1, 10), fields, uri)
    return uri


def timed(command: list[str]) -> float:
    environment = {key: value for key, value in os.environ.items() if key not in ("IMGCLS_LOG_LEVEL",)}
    environment["PYTHONPATH"] = str(REPO)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, timeout=1800, env=environment, cwd=REPO)
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{completed.stderr[-3000:]}")
    return wall


def folder_bytes(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else path.stat().st_size


def imgcls_export(model: str, export_format: str, output: Path) -> dict:
    wall = timed([sys.executable, str(REPO / "jobs" / "export.py"), "--model", model, "--format", export_format,
                  "--output", str(output)])  # fmt: skip
    metadata = json.loads((output / "metadata.json").read_text())["export"]
    model_file = output / metadata["model_file"]
    model_bytes = folder_bytes(output) - sum(folder_bytes(output / name) for name in ("labels.txt", "metadata.json"))
    return {"wall_s": wall, "total_bytes": folder_bytes(output), "model_bytes": model_bytes,
            "model_file_bytes": model_file.stat().st_size, "max_difference": metadata["check"]["max_abs_difference"]}  # fmt: skip


def plain_export(model: str, export_format: str, output: Path) -> dict:
    target = output / PLAIN_FILES[export_format] if PLAIN_FILES[export_format] else output
    output.mkdir(parents=True, exist_ok=True)
    wall = timed([sys.executable, "-c", PLAIN_EXPORT, str(Path(model) / "model.keras"), str(target),
                  KERAS_FORMATS[export_format]])  # fmt: skip
    return {"wall_s": wall, "model_bytes": folder_bytes(target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Artifact folder (default: the digits tutorial CNN, random weights).")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--formats", default="saved_model,onnx,litert")
    parser.add_argument("--results", default=str(RESULTS / "export.json"), help="Where the JSON report goes.")
    arguments = parser.parse_args()
    formats = [name.strip() for name in arguments.formats.split(",") if name.strip()]
    with tempfile.TemporaryDirectory(prefix="imgcls-bench-export-") as scratch_name:
        scratch = Path(scratch_name)
        model = arguments.model or default_artifact(scratch)
        runs: dict[str, dict[str, list[dict]]] = {name: {"imgcls": [], "plain": []} for name in formats}
        for round_index in range(arguments.rounds):
            for export_format in formats:
                contenders = [("imgcls", imgcls_export), ("plain", plain_export)]
                if round_index % 2:
                    contenders.reverse()
                for name, export in contenders:
                    output = scratch / f"{name}-{export_format}-{round_index}"
                    result = export(model, export_format, output)
                    runs[export_format][name].append(result)
                    print(f"round {round_index + 1} {export_format:<11} {name:<6} {result['wall_s']:6.1f} s "
                          f"{result['model_bytes'] / 1e6:7.2f} MB", flush=True)  # fmt: skip
    summary = {}
    for export_format, contenders in runs.items():
        imgcls_wall = statistics.median(run["wall_s"] for run in contenders["imgcls"])
        plain_wall = statistics.median(run["wall_s"] for run in contenders["plain"])
        last = contenders["imgcls"][-1]
        summary[export_format] = {
            "imgcls_export_s": round(imgcls_wall, 2),
            "plain_keras_export_s": round(plain_wall, 2),
            "ratio": round(imgcls_wall / plain_wall, 2),
            "imgcls_model_mb": round(last["model_bytes"] / 1e6, 3),
            "imgcls_folder_mb": round(last["total_bytes"] / 1e6, 3),
            "plain_model_mb": round(contenders["plain"][-1]["model_bytes"] / 1e6, 3),
            "max_difference": last["max_difference"],
        }
    report = {
        "model": arguments.model or "seed_cnn 32x32x1, 10 classes (random weights)",
        "rounds": arguments.rounds,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_end": [round(value, 2) for value in os.getloadavg()]},  # fmt: skip
        "formats": summary,
        "runs": runs,
    }
    results = Path(arguments.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(report, indent=2))
    for export_format, numbers in summary.items():
        print(f"{export_format:<11} imgcls {numbers['imgcls_export_s']:6.1f} s  plain {numbers['plain_keras_export_s']:6.1f} s  "
              f"x{numbers['ratio']:.2f}  imgcls {numbers['imgcls_model_mb']:.2f} MB  plain {numbers['plain_model_mb']:.2f} MB")  # fmt: skip
    print(f"-> {results}")


if __name__ == "__main__":
    main()
