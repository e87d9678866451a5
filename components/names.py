"""The names cnnflow writes into MLflow and reads back: tags and per-epoch metrics, once.

Every layer reads them from here (the engine names its metrics, tracking writes the tags, the
mirror and the report read both), so a renamed tag cannot drift between writer and reader.
MLflow's own tags come from `mlflow.utils.mlflow_tags` instead (MLFLOW_PARENT_RUN_ID, ...).
"""

from __future__ import annotations

# Run identity: which step made the run, and `<model>-v<N>` / `<step>-v<N>`.
STEP_TAG = "cnnflow.step"
MODEL_TAG = "cnnflow.model"
VERSION_TAG = "cnnflow.version"
ERROR_TAG = "cnnflow.error"
STEP_KEY_TAG = "cnnflow.step_key"
CODE_VERSION_TAG = "cnnflow.code_version"

# What a run was trained on and what it holds.
DATA_TAG = "cnnflow.data"
DATASET_TAG = "cnnflow.dataset"
DATASET_DIGEST_TAG = "cnnflow.dataset_digest"
CLASS_NAMES_TAG = "cnnflow.class_names"
DEVICE_TAG = "cnnflow.device"
MODEL_URI_TAG = "cnnflow.model_uri"
WEIGHTS_SOURCE_TAG = "cnnflow.weights_source"
PREPROCESS_RUN_TAG = "cnnflow.preprocess_run"
DATA_ROOT_TAG = "cnnflow.data_root"
PRESPLIT_TAG = "cnnflow.presplit"  # "true": the folder came split into train/val/test
FOLD_TAG = "cnnflow.fold"
CV_PARENT_TAG = "cnnflow.cv_parent"
TRIAL_TAG = "cnnflow.trial"
STUDY_TAG = "cnnflow.study"

# What later steps made of a run: its evaluation, its registered version, the tuning outcome.
EVALUATED_RUN_TAG = "cnnflow.evaluated_run_id"
SPLIT_TAG = "cnnflow.split"  # which split an evaluate job run judged
REGISTERED_VERSION_TAG = "cnnflow.registered_version"
BEST_TRIAL_TAG = "cnnflow.best_trial"
# + a tuned parameter: its best value (tags, not params: workers sharing one tune run
# rewrite them as the study improves, and MLflow params cannot change).
BEST_PARAM_TAG_PREFIX = "cnnflow.best."
RETRAINED_RUN_TAG = "cnnflow.retrained_run_id"
DECISION_REASON_TAG = "cnnflow.decision_reason"

# What explain and label-issues leave on the runs they looked at, for the mirror and report:
# the artifact path of evaluate's Grad-CAM overview figure (set on the evaluated run), and on
# a CV parent the label-issues run that ranked its out-of-fold predictions (its count is the
# parent's `n_label_issues` metric).
EXPLAIN_OVERVIEW_TAG = "cnnflow.explain_overview"
# evaluate --tta: on each registered version and logged model, the test-time augmentation it
# serves with (`none` when plain); on the evaluated run, `cnnflow.evaluated_<split>_tta`.
TTA_TAG = "cnnflow.tta"
# train --lr auto: the learning rate the range test chose (a param of the training run).
LR_CHOSEN_PARAM = "lr_chosen"
LABEL_ISSUES_RUN_TAG = "cnnflow.label_issues_run"
EXCLUDE_FILE_TAG = "cnnflow.exclude_file"  # train --exclude-file: the list it left out

# What `cnnflow export` writes: on its run, the model it exported; on each exported model and
# version, its format; per format, the gate's outcome ("registered vN" or "rejected: ...").
FORMAT_TAG = "cnnflow.format"
SOURCE_RUN_TAG = "cnnflow.source_run"
SOURCE_MODEL_TAG = "cnnflow.source_model"  # the exported model's name (resnet18, ensemble)
SOURCE_MODEL_URI_TAG = "cnnflow.source_model_uri"
EXPORT_GATE_TAG = "cnnflow.export.{}"

# What `cnnflow cascade` writes on its run (and the cascade's registered versions): the
# classifier it ran (URI), the detector (its name, or `boxes:<path>` for detections made
# elsewhere), the detector's weights, and the logged cascade model (with a detector only).
CLASSIFIER_URI_TAG = "cnnflow.classifier_uri"
DETECTOR_TAG = "cnnflow.detector"
DETECTOR_WEIGHTS_TAG = "cnnflow.detector_weights"
CASCADE_MODEL_URI_TAG = "cnnflow.cascade_model_uri"

# Per-epoch metrics the engine reports (step = epoch >= 1) and the mirror turns into `epochs`.
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_sec",
                 "train_images_per_sec")

# Heartbeats inside an epoch (components/tracking/heartbeat.py; step = the beat's number): the
# mirror's `status.progress` and its died detection read them. MLflow's UI groups `a/b` keys.
PROGRESS_EPOCH = "progress/epoch"  # 0 until the first batch of the run ends
PROGRESS_BATCH = "progress/batch"  # optimiser batches done in the epoch
PROGRESS_BATCHES = "progress/batches"  # batches per epoch
PROGRESS_IMAGES_PER_SEC = "progress/images_per_sec"  # training images/s since the epoch began
PROGRESS_METRICS = (PROGRESS_EPOCH, PROGRESS_BATCH, PROGRESS_BATCHES, PROGRESS_IMAGES_PER_SEC)
