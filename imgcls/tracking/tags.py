"""What a training's MLflow run is found by: its data and image counts, output_dir, the code's git
commit, and at the end its model_version; a Tune trial's run also by its parent search run and trial
id. Every value passes the credential check of `params`."""

from __future__ import annotations

import getpass
import subprocess
from pathlib import Path
from typing import Any

from imgcls.config import JobConfig
from imgcls.platform import storage
from imgcls.tracking.params import safe_tag

# Seconds `git` may take to name the commit before the tag is left out.
GIT_TIMEOUT_S = 5


# MLflow's own tags: the run a run is nested under in the UI, and the run's name.
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


# What a run is: a Tune search's parent run or one of its trials (a plain training has no such tag).
KIND_TAG = "imgcls.kind"
SEARCH_KIND = "tune_search"
TRIAL_KIND = "tune_trial"


def start_tags(config: JobConfig, output_dir: storage.Location) -> dict[str, str]:
    tags = {"imgcls.output_dir": output_dir.uri, "data.train": config.data.train}
    if config.data.val:
        tags["data.val"] = config.data.val
    commit = git_commit()
    if commit:
        # MLflow's UI shows its own key as the run's source version; `git_commit` is the one to search by.
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit})
    user = _user()
    if user:
        tags["mlflow.user"] = user
    return credential_free(tags)


def trial_tags(parent_run_id: str, trial_id: str, searched_keys: list[str]) -> dict[str, str]:
    """A Tune trial's run: nested under the search's run, named by its trial id, with the keys the
    search varies (their values are the run's params)."""
    return {
        PARENT_RUN_TAG: parent_run_id, RUN_NAME_TAG: trial_id, KIND_TAG: TRIAL_KIND,
        "imgcls.tune.trial_id": trial_id, "imgcls.tune.searched": ",".join(searched_keys),
    }  # fmt: skip


def data_tags(data_summary: dict[str, Any]) -> dict[str, str]:
    """Image counts of the decoded splits (what was actually trained and validated on)."""
    names = ("train_images", "val_images", "skipped_images", "task")
    return credential_free({name: str(data_summary[name]) for name in names if name in data_summary})


def credential_free(tags: dict[str, str]) -> dict[str, str]:
    checked = {key: safe_tag(key, value) for key, value in tags.items()}
    return {key: value for key, value in checked.items() if value is not None}


def git_commit() -> str | None:
    """The commit of the checkout imgcls runs from; None when it is not a tracked file of a git
    checkout (an installed package, a `ray job submit` upload) or git is missing."""
    package = Path(__file__).resolve().parents[1]
    try:
        tracked = subprocess.run(
            ["git", "-C", str(package), "ls-files", "--error-unmatch", "__init__.py"],
            capture_output=True, timeout=GIT_TIMEOUT_S,
        )  # fmt: skip
        if tracked.returncode != 0:
            return None
        head = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit if head.returncode == 0 and commit else None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in a container
        return None
