"""Image folders, splits, transforms, per-file reading and the extra-train filter.

Imports neither MLflow nor any other layer of cnnflow: data is the bottom layer.
"""
