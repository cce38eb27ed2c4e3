"""The run state of a job: every request, attempt, image and run, committed before anything depends on it."""
