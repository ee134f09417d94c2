"""What runs on the driver: the run directory, data preparation and tokenization, the Ray connection, searcher and
scheduler, resources, progress, W&B and results. May import every layer but the CLI."""
