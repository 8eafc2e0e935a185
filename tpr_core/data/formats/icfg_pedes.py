"""ICFG-PEDES: ``ICFG-PEDES.json`` (some copies name it ``ICFG_PEDES.json``), records
``{id, split, file_path, captions, processed_tokens}``, one caption per image.

Only train and test splits are distributed; prepare derives val from train identities.
"""

from tpr_core.data.formats._spec import FormatSpec

SPEC = FormatSpec(
    name="icfg-pedes",
    annotation_files=("ICFG-PEDES.json", "ICFG_PEDES.json"),
    path_field="file_path",
    splits=("train", "test"),
    derives_val=True,
)
