"""Running a model over images: one Predictor, where it runs (placement), in the job's process or an actor pool, and the engine both jobs use."""
