"""One module per entry point (eda, preprocess, train, evaluate, ...), named as the entry point;
`params` declares every entry point's parameters (torch- and MLflow-free)."""
