"""MLflow tracking of training runs and Tune searches (README, Experiment tracking with MLflow).

    settings      whether a run is tracked and where; what rank 0 is handed (no MLflow)
    params        the resolved config as params, without credentials (no MLflow)
    server        the client every module here uses, its retries bounded, and the start's check
    runs          the experiment, and the run found again for a resumed output_dir (tracking.json)
    tags          what a run is found by: data, image counts, output_dir, git commit, a trial's parent
    artifacts     the run's outputs as MLflow artifacts, or links to them in a bucket
    epoch_sink    rank 0's per-epoch metrics, the epoch as the step
    training_run  what the training driver logs at the start and at the end
    search_run    a Tune search's parent run, its trials' runs nested under it, and the outcome

Only `settings` and `params` may be imported when tracking is off: nothing of this package imports
MLflow unless a tracking URI is set (tests/test_import_boundaries.py checks it).
"""
