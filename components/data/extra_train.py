"""`train --extra-train`: labelled images added to the train split only, never leaking.

Any image whose content (sha1 of the file bytes, as `preprocess` hashes) equals a val or test
image of the run's split is excluded, so nothing leaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.data.datasets import (
    DataError,
    DatasetSplits,
    list_images,
    scan_images,
)

# --------------------------------------------------------------------------------------------
# `train --extra-train`
# --------------------------------------------------------------------------------------------


@dataclass
class ExtraTrain:
    samples: list[tuple[str, int]]
    rows: list[dict[str, Any]]  # one per file: path, label, sha1, used, reason

    @property
    def n_excluded(self) -> int:
        return sum(not r["used"] for r in self.rows)


def extra_train_samples(folder: str | Path, splits: DatasetSplits) -> ExtraTrain:
    """Labelled images of `folder` (class sub-folders) for the train split only.

    Classes must be among the run's classes. An image whose bytes equal a val or test
    image's is excluded (it would let the model see the evaluation images); unreadable
    files are excluded too. Both are listed with the reason.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"extra_train folder {root} does not exist or is not a folder")
    listing = list_images(root)
    if listing.presplit:
        raise DataError(f"extra_train folder {root} has a train/ folder: pass a folder "
                        "of class sub-folders (its images all go to train)")
    per_class = listing.files["all"]
    unknown = sorted(set(per_class) - set(splits.classes))
    if unknown:
        raise DataError(f"extra_train classes {', '.join(unknown)} are not classes of "
                        f"the dataset ({', '.join(splits.classes)})")
    hashes = splits.content_hashes()  # from the scan that made the split: no second read
    held_out = {hashes[p] for p, _ in splits.val + splits.test}
    index = {c: i for i, c in enumerate(splits.classes)}
    paths = [p for cls in sorted(per_class) for p in per_class[cls]]
    sha1_of, bad_list = scan_images(paths)  # one read per file: hash and decode check
    bad = dict(bad_list)
    samples: list[tuple[str, int]] = []
    rows: list[dict[str, Any]] = []
    for cls in sorted(per_class):
        for path in per_class[cls]:
            sha1 = sha1_of.get(str(path), "")
            reason = bad.get(str(path), "")
            if not reason and sha1 in held_out:
                reason = "same content as a val/test image (leakage)"
            rows.append({"path": str(path), "label": cls, "sha1": sha1, "used": not reason,
                         "reason": reason})
            if not reason:
                samples.append((str(path), index[cls]))
    return ExtraTrain(samples, rows)


