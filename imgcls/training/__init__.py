"""Ray Train workers: the plan the driver hands them, the per-worker loop, distributed steps, state, checkpoints, fine-tuning phases, data feed, schedules."""
