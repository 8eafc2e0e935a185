"""CUHK-PEDES: ``reid_raw.json``, records ``{id, split, file_path, captions, processed_tokens}``.

Splits train, val and test; images under ``imgs/`` in per-source sub-folders (``CUHK03/``,
``Market/``, ``test_query/``, ...). The synthetic generator writes this layout too.
"""

from tpr_core.data.formats._spec import FormatSpec

SPEC = FormatSpec(
    name="cuhk-pedes",
    annotation_files=("reid_raw.json",),
    path_field="file_path",
    splits=("train", "val", "test"),
)
