"""The model registry, the training loop and its distributed plumbing: torch only, no MLflow."""
