"""Training stages: resolved settings, the stage runner, and the process launcher."""
