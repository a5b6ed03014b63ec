"""Run: absl apps, one per experiment, configured by the files in configs/."""
