"""RSTPReid: ``data_captions.json``, records ``{id, split, img_path, captions}``, ids from 0.

Splits train, val and test; the image path field is ``img_path`` (not ``file_path``).
"""

from tpr_core.data.formats._spec import FormatSpec

SPEC = FormatSpec(
    name="rstpreid",
    annotation_files=("data_captions.json",),
    path_field="img_path",
    splits=("train", "val", "test"),
)
