"""Synthetic pedestrians: CUHK-PEDES layout, splits, determinism, visible-only captions, pixels."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tpr_core.data import synth
from tpr_core.data.synth.attributes import SIGNATURE_KEYS

N_IDS, N_IMGS, SIZE = 12, 2, (64, 32)
KW = dict(identities=N_IDS, images_per_identity=N_IMGS, captions_per_image=2, size=SIZE)
#: Digest of ``synth.generate(out, seed=0, **KW)`` (see ``test_output_bytes_are_pinned``).
GOLDEN_DIGEST = "4c0a546bc3441846846508020d9dd82c422507d7a647079ed3374200e2d51cf8"

LOGO_WORDS = ("logo", "print on the chest", "pattern on the front")
SHOE_WORDS = ("shoes", "sneakers", "trainers")
BAG_WORDS = {
    "backpack": ("backpack", "rucksack"),
    "handbag": ("handbag", "purse"),
    "shoulder bag": ("shoulder bag", "messenger bag"),
}


def _words(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = synth.generate(out, seed=0, **KW)
    assert summary["reused"] is False
    return out


@pytest.fixture(scope="module")
def raw(ds: Path) -> list[dict]:
    return json.loads((ds / "reid_raw.json").read_text())


@pytest.fixture(scope="module")
def attrs(ds: Path) -> dict[int, dict]:
    return {int(k): v for k, v in json.loads((ds / "attributes.json").read_text()).items()}


@pytest.fixture(scope="module")
def views(ds: Path) -> dict[str, dict]:
    return json.loads((ds / "views.json").read_text())


def test_cuhk_pedes_layout(ds: Path, raw: list[dict]) -> None:
    assert isinstance(raw, list) and len(raw) == N_IDS * N_IMGS
    for r in raw:
        assert list(r) == ["split", "captions", "file_path", "id", "processed_tokens"]
        assert isinstance(r["id"], int) and r["split"] in ("train", "val", "test")
        assert len(r["captions"]) == 2 and all(isinstance(c, str) and c for c in r["captions"])
        assert re.fullmatch(r"synth/\d{4}/\d{4}_\d{2}\.jpg", r["file_path"])
        assert r["file_path"].startswith(f"synth/{r['id']:04d}/")
        assert (ds / "imgs" / r["file_path"]).is_file()
        # one lowercase token list per caption: the caption's words with punctuation dropped
        assert r["processed_tokens"] == [_words(c) for c in r["captions"]]
    on_disk = sorted(str(p.relative_to(ds / "imgs")) for p in (ds / "imgs").rglob("*.jpg"))
    assert on_disk == sorted(r["file_path"] for r in raw)
    assert sorted(p.name for p in ds.iterdir()) == [
        "attributes.json",
        "imgs",
        "reid_raw.json",
        "synth.json",
        "views.json",
    ]
    # written atomically: no temporary folder left beside the output
    assert [p.name for p in ds.parent.iterdir()] == ["ds"]


def test_ids_start_at_one_and_splits_are_identity_disjoint(raw: list[dict]) -> None:
    ids = sorted({r["id"] for r in raw})
    assert ids == list(range(1, N_IDS + 1))
    split_of: dict[int, set[str]] = {}
    for r in raw:
        split_of.setdefault(r["id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in split_of.values())
    per_split = {s: sum(1 for v in split_of.values() if v == {s}) for s in ("train", "val", "test")}
    # round(0.15 * 12) = 2 identities each for val and test, the rest train
    assert per_split == {"train": 8, "val": 2, "test": 2}


def test_smallest_cli_size_has_all_three_splits(tmp_path: Path) -> None:
    s = synth.generate(
        tmp_path / "d", identities=6, images_per_identity=1, captions_per_image=1, seed=3, size=(32, 16)
    )
    assert s["identities"] == {"train": 4, "val": 1, "test": 1}
    assert s["images"] == {"train": 4, "val": 1, "test": 1}


def test_images_decode_at_requested_size(ds: Path, raw: list[dict]) -> None:
    for r in raw:
        with Image.open(ds / "imgs" / r["file_path"]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE[1], SIZE[0])


def test_images_of_one_identity_differ(ds: Path, raw: list[dict]) -> None:
    by_id: dict[int, list[np.ndarray]] = {}
    for r in raw:
        by_id.setdefault(r["id"], []).append(np.asarray(Image.open(ds / "imgs" / r["file_path"]), np.float32))
    for pid, ims in by_id.items():
        assert len(ims) == N_IMGS
        assert np.abs(ims[0] - ims[1]).mean() > 5.0, f"id {pid}: images nearly identical"


def test_same_seed_same_bytes_other_seed_differs(ds: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    synth.generate(again, seed=0, workers=2, **KW)  # other worker count, same bytes
    assert _files(again) == _files(ds)
    other = tmp_path / "other"
    synth.generate(other, seed=1, **KW)
    a, b = _files(ds), _files(other)
    assert a["reid_raw.json"] != b["reid_raw.json"]
    assert a["imgs/synth/0001/0001_00.jpg"] != b["imgs/synth/0001/0001_00.jpg"]


def test_output_bytes_are_pinned(ds: Path) -> None:
    """The module's dataset hashes to a pinned digest (sha256 of "path sha256" lines, sorted).

    A change to attributes, captions or rendering changes it: bump ``GENERATOR_VERSION`` and
    re-pin. Other Pillow, libjpeg or numpy builds may also change the bytes; then re-pin.
    """
    files = _files(ds)
    lines = "".join(f"{name} {hashlib.sha256(data).hexdigest()}\n" for name, data in sorted(files.items()))
    assert len(files) == N_IDS * N_IMGS + 4  # the images and the four JSON files
    assert hashlib.sha256(lines.encode()).hexdigest() == GOLDEN_DIGEST


def test_second_call_reuses_other_params_error(ds: Path, tmp_path: Path) -> None:
    before = (ds / "reid_raw.json").stat().st_mtime_ns
    s = synth.generate(ds, seed=0, **KW)
    assert s["reused"] is True and s["identities"] == {"train": 8, "val": 2, "test": 2}
    assert (ds / "reid_raw.json").stat().st_mtime_ns == before
    assert synth.ensure_synthetic(ds, seed=0, **KW) == ds
    with pytest.raises(synth.SynthError, match=r"synth\.json.*seed: existing 0 vs requested 5"):
        synth.generate(ds, seed=5, **KW)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(synth.SynthError, match="no reid_raw.json"):
        synth.ensure_synthetic(foreign, seed=0, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]  # nothing half-written


def test_attributes_sidecar_uses_the_vocabulary(attrs: dict[int, dict]) -> None:
    assert sorted(attrs) == list(range(1, N_IDS + 1))
    for a in attrs.values():
        assert a["gender"] in synth.GENDERS and a["build"] in synth.BUILDS
        assert a["hair_length"] in synth.HAIR_LENGTHS and a["hair_color"] in synth.HAIR_COLORS
        assert a["upper_type"] in synth.UPPER_TYPES and a["sleeve"] in synth.SLEEVES
        assert a["upper_color"] in synth.UPPER_COLORS and a["lower_color"] in synth.LOWER_COLORS
        assert a["lower_type"] in synth.LOWER_TYPES and a["shoe_color"] in synth.SHOE_COLORS
        assert a["bag"] in synth.BAG_TYPES
        assert (a["bag_color"] is None) == (a["bag"] == "none")
        assert (a["bag_side"] in synth.SIDES) == (a["bag"] in ("handbag", "shoulder bag"))
        assert a["logo"] is None or a["logo"] in synth.LOGO_COLORS
        assert a["hat"] is None or a["hat"] in synth.HAT_COLORS
        assert isinstance(a["glasses"], bool)
        if a["lower_type"] == "skirt":
            assert a["gender"] == "woman"


def test_identities_share_outfits_but_are_all_distinct() -> None:
    ids = synth.make_identities(60, seed=0)
    keys = SIGNATURE_KEYS  # the attributes a caption can name
    full = [tuple(a[k] for k in keys) for a in ids.values()]
    assert len(set(full)) == 60
    top_bottom = [(a["upper_color"], a["lower_color"]) for a in ids.values()]
    # clusters of about three: many pairs repeat, so retrieval needs shoes, bags, hair
    assert len(set(top_bottom)) <= 35
    assert max(top_bottom.count(t) for t in set(top_bottom)) >= 3


def test_captions_have_commas_and_name_the_upper_garment_colour(
    raw: list[dict], attrs: dict[int, dict]
) -> None:
    caps = [(r["id"], c) for r in raw for c in r["captions"]]
    assert sum("," in c for _, c in caps) / len(caps) >= 0.7
    for pid, c in caps:
        assert attrs[pid]["upper_color"] in _words(c), c
        assert c[0].isupper() and c.endswith(".")


def test_captions_name_only_this_persons_colours(raw: list[dict], attrs: dict[int, dict]) -> None:
    palette = set(synth.COLORS) | set(synth.HAIR_COLORS)
    for r in raw:
        a = attrs[r["id"]]
        own = {
            a["upper_color"],
            a["lower_color"],
            a["shoe_color"],
            a["hair_color"],
            a["bag_color"],
            a["logo"],
            a["hat"],
        }
        for c in r["captions"]:
            assert set(_words(c)) & palette <= own, (c, a)


def test_dataset_captions_mention_only_visible_items(
    raw: list[dict], attrs: dict[int, dict], views: dict[str, dict]
) -> None:
    assert {v["view"] for v in views.values()} >= {"front", "back"}
    for r in raw:
        a, info = attrs[r["id"]], views[r["file_path"]]
        for c in r["captions"]:
            low = c.lower()
            if info["view"] != "front":
                assert not any(w in low for w in LOGO_WORDS), c
            if info["view"] == "back":
                assert "glasses" not in low, c
            if "shoes" in info["hidden"]:
                assert not any(w in low for w in SHOE_WORDS), c
            bag_named = a["bag"] != "none" and any(w in low for w in BAG_WORDS[a["bag"]])
            if "bag" in info["hidden"]:
                assert not bag_named, c


def _person(**over: object) -> dict:
    a = {
        "gender": "woman",
        "build": "average",
        "skin": 0,
        "hair_length": "long",
        "hair_color": "black",
        "upper_type": "t-shirt",
        "sleeve": "short",
        "upper_color": "red",
        "logo": "yellow",
        "logo_shape": "circle",
        "lower_type": "trousers",
        "lower_color": "blue",
        "shoe_color": "white",
        "bag": "backpack",
        "bag_color": "black",
        "bag_side": None,
        "hat": None,
        "glasses": True,
        "outfit": 0,
    }
    a.update(over)
    return a


def test_describe_follows_the_view() -> None:
    a = _person()
    rng = np.random.default_rng(0)
    back = [synth.describe(a, rng, view="back") for _ in range(200)]
    front = [synth.describe(a, rng, view="front") for _ in range(200)]
    for c in back:
        low = c.lower()
        assert not any(w in low for w in LOGO_WORDS) and "yellow" not in low, c
        assert "glasses" not in low, c
        assert "black backpack" in low or "black rucksack" in low, c  # a visible bag is never omitted
        assert "straps" not in low, c
    assert sum(any(w in c.lower() for w in LOGO_WORDS) for c in front) > 100  # seen from the front
    assert sum("glasses" in c for c in front) > 100
    assert sum("straps" in c for c in front) > 20  # only the straps of the backpack show
    assert all(("backpack" in c or "rucksack" in c) for c in front)


def test_describe_handbag_hidden_on_far_side_and_occluded_items() -> None:
    a = _person(bag="handbag", bag_side="left", logo=None, glasses=False, hair_color="brown")
    rng = np.random.default_rng(1)
    assert all("handbag" in c or "purse" in c for c in (synth.describe(a, rng, "left") for _ in range(50)))
    assert not any(
        "handbag" in c or "purse" in c or "black" in c
        for c in (synth.describe(a, rng, "right") for _ in range(50))
    )
    hidden = [synth.describe(a, rng, "front", hidden=["shoes"]) for _ in range(50)]
    assert not any(w in c for c in hidden for w in SHOE_WORDS)
    shown = [synth.describe(a, rng, "front") for _ in range(50)]
    assert sum(any(w in c for w in SHOE_WORDS) for c in shown) > 25


def test_describe_varies_wording_and_keeps_the_facts() -> None:
    a = _person(logo=None, glasses=False, bag="none", bag_color=None)
    rng = np.random.default_rng(2)
    caps = [synth.describe(a, rng) for _ in range(100)]
    assert len(set(caps)) > 60
    assert (
        any("jeans" in c for c in caps)
        and any("pants" in c for c in caps)
        and any("trousers" in c for c in caps)
    )
    assert any(c.startswith("A woman") for c in caps) and any("lady" in c or "girl" in c for c in caps)
    for c in caps:
        w = _words(c)
        assert "red" in w and not ({"man", "guy", "he", "his"} & set(w)), c
        assert "bag" not in w and "backpack" not in w, c


def test_upper_garment_colour_is_in_the_pixels(
    ds: Path, raw: list[dict], attrs: dict[int, dict], views: dict[str, dict]
) -> None:
    names = list(synth.COLORS)
    palette = np.array([synth.COLORS[n] for n in names], np.float64)
    checked = 0
    for r in raw:
        info = views[r["file_path"]]
        if info["view"] not in ("front", "back") or info["occlusion"]:
            continue
        x0, y0, x1, y1 = info["torso_box"]
        px = np.asarray(Image.open(ds / "imgs" / r["file_path"]).convert("RGB"))[y0:y1, x0:x1].reshape(-1, 3)
        assert len(px) >= 9
        med = np.median(px.astype(np.float64), axis=0)  # robust to a strap or zip line
        nearest = names[int(np.argmin(((palette - med) ** 2).sum(axis=1)))]
        assert nearest == attrs[r["id"]]["upper_color"], (r["file_path"], med, nearest)
        checked += 1
    assert checked >= 8


def test_bad_arguments_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identities"):
        synth.generate(tmp_path / "x", identities=2, images_per_identity=1, size=(32, 16))
    with pytest.raises(ValueError, match="size"):
        synth.generate(tmp_path / "x", identities=6, images_per_identity=1, size=(8, 4))
    with pytest.raises(ValueError, match="view"):
        synth.describe(_person(), np.random.default_rng(0), view="top")
    assert not (tmp_path / "x").exists()
