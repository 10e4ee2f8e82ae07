"""Importing TensorFlow for inference in as little time as it takes.

`import tensorflow` also imports Keras, and Keras imports scikit-learn (for its sklearn wrappers) and
matplotlib (for its plot galleries) whenever they are installed: a large share of a fresh process's
TensorFlow import, paid by every model actor before it classifies its first image. A predictor uses neither, so in processes imgcls owns (model actors, and the driver of
a job started from the command line) TensorFlow is imported with them hidden. In such a process
Keras' sklearn wrappers and plot galleries are unavailable; the packages themselves still import
normally afterwards. In someone else's process (a notebook calling `imgcls.predict.run`) nothing is
hidden.
"""

from __future__ import annotations

import sys
from types import ModuleType

KERAS_OPTIONAL_PACKAGES = ("sklearn", "matplotlib")

_process_is_ours = False


def claim_process() -> None:
    """Called by the command line: this process runs one imgcls job and nothing else."""
    global _process_is_ours
    _process_is_ours = True


def process_is_ours() -> bool:
    return _process_is_ours


def import_for_inference(lean: bool = True) -> ModuleType:
    """Import TensorFlow (and Keras); with `lean`, without Keras' optional extras (see the module
    docstring). A no-op when TensorFlow is already imported."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    # A None entry makes `import name` raise ImportError, which Keras takes as "not installed".
    hidden = [name for name in KERAS_OPTIONAL_PACKAGES if lean and name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    from imgcls.platform.logs import native_chatter_filtered

    try:
        with native_chatter_filtered():
            import keras  # noqa: F401  (imports tensorflow, its backend)
            import tensorflow
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return tensorflow
