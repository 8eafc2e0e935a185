"""The reader spec of a raw dataset source format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FormatSpec:
    """How ``tpr data prepare`` reads one source format as distributed.

    Every format is a JSON list of records with ``id`` (int identity), ``split`` and
    ``captions`` (list of strings), and a field holding the image path relative to
    ``image_dir``; they differ in the annotation file's name, that field's name and the splits.

    Attributes:
        name: The ``--format`` / ``data.format`` value.
        annotation_files: Candidate annotation file names under the root; the first that exists wins.
        path_field: The record field holding the image path.
        splits: The splits a record may name.
        derives_val: The source has no val split: prepare holds out a share of the train
            identities as val (``val_fraction``, ``seed``).
        image_dir: Folder under the root holding the images.
    """

    name: str
    annotation_files: tuple[str, ...]
    path_field: str
    splits: tuple[str, ...]
    derives_val: bool = False
    image_dir: str = "imgs"
