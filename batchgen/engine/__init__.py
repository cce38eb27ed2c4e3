"""The run engine: the scheduler and its moving parts, the rate controller, uploads, and the run itself."""
