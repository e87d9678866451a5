"""One module per entry point (eda, preprocess, train, evaluate, ...), named as the entry point."""
