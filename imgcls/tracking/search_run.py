"""What a Ray Tune search's driver logs to MLflow. At the start: one parent run for the search (found
again through the search's own output_dir/tracking.json when it is rerun), its settings and base
config as params; every trial's training run is nested under it (`tags.trial_tags`). After the
trials: each trial's outcome on its run, with the terminal status of the runs Tune stopped, then the
best trial, best_<metric> and the search's outputs on the parent. Nothing after the start may fail
the search: the first failure is one warning, and tracking stops there."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from imgcls.config import JobConfig
from imgcls.errors import clip
from imgcls.platform import storage
from imgcls.tracking.artifacts import log_search_outputs, set_tags
from imgcls.tracking.params import config_params
from imgcls.tracking.runs import resolve_run_id
from imgcls.tracking.settings import TrackingTarget, experiment_name
from imgcls.tracking.tags import KIND_TAG, SEARCH_KIND, start_tags
from imgcls.tracking.training_run import TrackedRun, open_run, run_link

if TYPE_CHECKING:
    from imgcls.tune import TrialSummary, TuneResult

logger = logging.getLogger(__name__)

# The MLflow status a trial's run ends with, by its status in trials.csv. Tune stops a trial by
# ending its process (ASHA), which leaves the run RUNNING; a run already FINISHED stays so.
TRIAL_RUN_STATUS = {
    "completed": "FINISHED", "early_stopped": "FINISHED", "stopped_by_asha": "KILLED", "error": "FAILED",
    "not_run": "KILLED",
}  # fmt: skip


class SearchRun(TrackedRun):
    """A Tune search's parent run, as the search's driver logs to it."""

    job = "search"

    def __init__(self, client, tracking_uri: str, run_id: str, output_dir: storage.Location) -> None:
        super().__init__(client, tracking_uri, run_id, output_dir)
        self.trial_run_ids: dict[str, str] = {}  # trial id -> its run, found by trials_ended

    @property
    def target(self) -> TrackingTarget:
        """What each trial is handed: the server, and the run to nest its own under."""
        return TrackingTarget(tracking_uri=self.tracking_uri, run_id=self.run_id)

    def trials_ended(self, trials: list[TrialSummary], trials_root: storage.Location) -> None:
        """Each trial's status and epochs on its run, `imgcls.tune.best` false until `finished` names
        the best, and the terminal status of the runs Tune stopped."""
        self._attempt("the trials' outcomes", lambda: self._log_trials(trials, trials_root))

    def finished(self, result: TuneResult, metric: str) -> None:
        """The best trial (on its run and the parent), best_<metric>, the search's outputs and FINISHED."""
        self._attempt("the end of the search (best trial, trials.csv, FINISHED)", lambda: self._finish(result, metric))

    def _log_trials(self, trials: list[TrialSummary], trials_root: storage.Location) -> None:
        self._check_server()
        for trial in trials:
            run_id = resolve_run_id(trials_root.join(trial.trial_id))
            if run_id is None:
                continue  # the trial never got as far as starting its run
            self.trial_run_ids[trial.trial_id] = run_id
            outcome = {"imgcls.tune.status": trial.status, "imgcls.tune.epochs": str(trial.epochs), "imgcls.tune.best": "false"}
            set_tags(self.client, run_id, outcome)
            status = TRIAL_RUN_STATUS[trial.status]
            if self.client.get_run(run_id).info.status not in ("FINISHED", status):
                self.client.set_terminated(run_id, status)

    def _finish(self, result: TuneResult, metric: str) -> None:
        from mlflow.entities import Metric

        best_run_id = self.trial_run_ids.get(result.best_trial_id)
        parent_tags = {"imgcls.tune.best_trial_id": result.best_trial_id}
        if best_run_id is not None:
            set_tags(self.client, best_run_id, {"imgcls.tune.best": "true"})
            parent_tags["imgcls.tune.best_run_id"] = best_run_id
        set_tags(self.client, self.run_id, parent_tags)
        best = Metric(f"best_{metric}", result.best_metric, int(time.time() * 1000), 0)
        self.client.log_batch(self.run_id, metrics=[best], synchronous=True)
        outputs = log_search_outputs(self.client, self.run_id, self.output_dir)
        self.client.set_terminated(self.run_id, "FINISHED")
        logger.info(
            "MLflow: the outcome of %d trial run(s) logged; search run %s has best trial %s (run %s), best_%s "
            "%.4f and %s (%s)", len(self.trial_run_ids), self.run_id, result.best_trial_id, best_run_id or "-", metric,
            result.best_metric, ", ".join(outputs), "copied" if self.output_dir.is_local else "linked",
        )  # fmt: skip


def search_params(config: JobConfig) -> dict[str, str]:
    """The search's settings (`tune.*`, its mode resolved, the search space as one JSON text) and the
    base config flattened, as params without credentials."""
    values = config.model_dump(mode="json")
    settings = values.pop("tune")
    settings["mode"] = config.tune.resolved_mode()
    settings["search_space"] = json.dumps(settings["search_space"], separators=(", ", ": "))
    return config_params({**values, "tune": settings})


def start_search_run(config: JobConfig, output_dir: storage.Location) -> SearchRun:
    """The search's parent run in MLflow, its params and tags logged; UserError (exit 2) naming the
    URI when the server does not answer or refuses."""
    tags = {**start_tags(config, output_dir), KIND_TAG: SEARCH_KIND}
    opened = open_run(config, output_dir, tags, search_params(config))
    logger.info(
        "tracking the search in MLflow at %s: experiment %s, %s search run %s%s; each trial's run is nested "
        "under it", clip(opened.tracking_uri), clip(experiment_name(config.tracking)),
        "resumed" if opened.resumed else "new", opened.run_id,
        run_link(opened.tracking_uri, opened.experiment_id, opened.run_id),
    )  # fmt: skip
    return SearchRun(opened.client, opened.tracking_uri, opened.run_id, output_dir)
