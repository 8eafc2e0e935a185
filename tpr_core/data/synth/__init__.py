"""Synthetic pedestrians in the exact CUHK-PEDES layout (``tpr data synth``).

The project's stand-in for the real datasets, which cannot be downloaded here. Every identity
has a set of attributes (gender, hair, garments and their colours, shoes, bag, hat, glasses,
build); every image renders that person with PIL from a random viewpoint, pose, scale, background,
lighting, occlusion and noise; every caption is written from the attributes *visible in that
image*, in the style of CUHK-PEDES.

Identities are drawn from shared outfit clusters (same top and bottom, different shoes, bag, hair),
so retrieval needs the fine details and not only the two dominant colours.

Modules: ``attributes`` (vocabulary, identity sampling, visibility), ``captions`` (``describe``),
``figure`` (drawing the person), ``rendering`` (``render_image``: backdrop, person, occluder,
camera), ``generation`` (``generate``, ``ensure_synthetic``: the dataset folder).

Output folder ``OUT``::

    reid_raw.json      list of {split, captions, file_path, id, processed_tokens}  (CUHK-PEDES)
    imgs/synth/0001/0001_00.jpg ...
    attributes.json    sidecar, not CUHK-PEDES: {"<id>": attribute dict}
    views.json         sidecar: {"<file_path>": {view, occlusion, hidden, torso_box}}
    synth.json         the generation parameters (reuse check); written last

Determinism: one ``numpy.random.Generator`` per (seed, identity) for attributes and per
(seed, identity, image) for the image and its captions, so no result depends on iteration order
or on the number of worker processes; no timestamps are written; JPEG quality is fixed.
"""

from tpr_core.data.synth.attributes import (
    BAG_COLORS,
    BAG_TYPES,
    BUILDS,
    COLORS,
    GENDERS,
    HAIR_COLORS,
    HAIR_LENGTHS,
    HAT_COLORS,
    LOGO_COLORS,
    LOWER_COLORS,
    LOWER_TYPES,
    SHOE_COLORS,
    SIDES,
    SLEEVES,
    UPPER_COLORS,
    UPPER_TYPES,
    VIEWS,
    make_identities,
    visible_attributes,
)
from tpr_core.data.synth.captions import describe
from tpr_core.data.synth.generation import SPLITS, SynthError, ensure_synthetic, generate
from tpr_core.data.synth.rendering import render_image

__all__ = [
    "BAG_COLORS",
    "BAG_TYPES",
    "BUILDS",
    "COLORS",
    "GENDERS",
    "HAIR_COLORS",
    "HAIR_LENGTHS",
    "HAT_COLORS",
    "LOGO_COLORS",
    "LOWER_COLORS",
    "LOWER_TYPES",
    "SHOE_COLORS",
    "SIDES",
    "SLEEVES",
    "SPLITS",
    "UPPER_COLORS",
    "UPPER_TYPES",
    "VIEWS",
    "SynthError",
    "describe",
    "ensure_synthetic",
    "generate",
    "make_identities",
    "render_image",
    "visible_attributes",
]
