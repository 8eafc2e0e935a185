"""tpr_core.data.prepare / store: raw formats -> Parquet shards, bad input, read back."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tpr_core import __version__
from tpr_core.data.prepare import prepare
from tpr_core.data.store import (
    MANIFEST_NAME,
    SCHEMA,
    DataFormatError,
    DatasetNotPreparedError,
    load_split_table,
    open_dataset,
    read_manifest,
)

# --------------------------------------------------------------------------- fixtures in the real layouts

ANNOTATION = {
    "cuhk-pedes": "reid_raw.json",
    "icfg-pedes": "ICFG-PEDES.json",
    "rstpreid": "data_captions.json",
}
PATH_FIELD = {"cuhk-pedes": "file_path", "icfg-pedes": "file_path", "rstpreid": "img_path"}


def make_image(path: Path, seed: int, fmt: str = "JPEG") -> bytes:
    """A small noisy picture, so that every file's bytes differ."""
    rng = np.random.default_rng(seed)
    arr = (rng.random((24, 12, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def dump(root: Path, fmt: str, records: list[Any]) -> None:
    (root / ANNOTATION[fmt]).write_text(json.dumps(records))


def build_cuhk(root: Path) -> list[dict[str, Any]]:
    """CUHK-PEDES: sub-folders per source, png and jpg, 2 captions mostly, some 3 or 4,
    captions with trailing whitespace/newlines, processed_tokens, records not in id order."""
    # (id, split, file_path, number of captions)
    spec = [
        (12, "train", "CUHK03/12_1.jpg", 2),
        (3, "train", "Market/0003_c1_01.jpg", 2),
        (3, "train", "Market/0003_c2_01.jpg", 3),
        (12, "train", "CUHK03/12_2.jpg", 2),
        (40, "train", "CUHK01/0040001.png", 4),
        (7, "val", "test_query/p7_s1.jpg", 2),
        (5, "val", "test_query/p5_s1.jpg", 2),
        (5, "val", "test_query/p5_s2.jpg", 2),
        (101, "test", "VIPER/101_a.jpg", 2),
        (99, "test", "VIPER/099_a.jpg", 3),
        (99, "test", "VIPER/099_b.jpg", 2),
    ]
    records = []
    for k, (pid, split, fp, n) in enumerate(spec):
        make_image(root / "imgs" / fp, k, "PNG" if fp.endswith(".png") else "JPEG")
        caps = [f"person {pid} image {k} caption {j}." + (" \n" if j == 1 else "") for j in range(n)]
        records.append(
            {
                "split": split,
                "captions": caps,
                "file_path": fp,
                "processed_tokens": [c.split() for c in caps],
                "id": pid,
            }
        )
    dump(root, "cuhk-pedes", records)
    return records


def build_icfg(root: Path, n_ids: int = 20, name: str = "ICFG-PEDES.json") -> list[dict[str, Any]]:
    """ICFG-PEDES: one caption per image, train/test only, 2 images per identity."""
    records = []
    for pid in range(1, n_ids + 1):
        split = "test" if pid > n_ids - 4 else "train"
        for s in range(2):
            fp = f"{split}/{pid:04d}/{pid:04d}_{s:03d}.jpg"
            make_image(root / "imgs" / fp, pid * 10 + s)
            cap = f"the woman {pid} wears a coat, shot {s}.\n"
            records.append(
                {
                    "id": pid,
                    "file_path": fp,
                    "captions": [cap],
                    "processed_tokens": [cap.split()],
                    "split": split,
                }
            )
    (root / name).write_text(json.dumps(records))
    return records


def build_rstp(root: Path) -> list[dict[str, Any]]:
    """RSTPReid: img_path, 2 captions per image, ids from 0."""
    spec = [(0, "train"), (0, "train"), (1, "train"), (2, "val"), (3, "val"), (4, "test"), (4, "test")]
    records = []
    for k, (pid, split) in enumerate(spec):
        fp = f"{pid:04d}_c{k}_{k:04d}.jpg"
        make_image(root / "imgs" / fp, 100 + k)
        records.append(
            {
                "id": pid,
                "img_path": fp,
                "captions": [f"a man {pid} {k} a.", f"a man {pid} {k} b. "],
                "split": split,
            }
        )
    dump(root, "rstpreid", records)
    return records


BUILD = {"cuhk-pedes": build_cuhk, "icfg-pedes": build_icfg, "rstpreid": build_rstp}


def expected_rows(records: list[dict[str, Any]], path_field: str, split_of=None) -> list[dict[str, Any]]:
    """The rows prepare must write, computed plainly from the records."""
    rows = []
    image_id = 0
    for split in ("train", "val", "test"):
        recs = [r for r in records if (split_of(r) if split_of else r["split"]) == split]
        ids = sorted({r["id"] for r in recs})
        for r in sorted(recs, key=lambda r: (ids.index(r["id"]), r[path_field])):
            for j, c in enumerate(r["captions"]):
                rows.append(
                    {
                        "split": split,
                        "pid": ids.index(r["id"]),
                        "orig_id": r["id"],
                        "image_id": image_id,
                        "image_path": r[path_field],
                        "caption": c.strip(),
                        "caption_index": j,
                    }
                )
            image_id += 1
    return rows


def no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)] == []


# --------------------------------------------------------------------------- happy paths


def test_cuhk_rows_counts_bytes_and_manifest(tmp_path: Path) -> None:
    root, out = tmp_path / "CUHK-PEDES", tmp_path / "prepared"
    records = build_cuhk(root)
    manifest = prepare("cuhk-pedes", root, out, shard_rows=4)

    table = ds.dataset(out).to_table()  # the plain call, with the manifest in the folder
    got = table.drop_columns(["image"]).to_pylist()
    assert got == expected_rows(records, "file_path")
    for row in table.to_pylist():
        assert row["image"] == (root / "imgs" / row["image_path"]).read_bytes()

    assert manifest == json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["source_format"] == "cuhk-pedes"
    assert manifest["source_file"] == "reid_raw.json"
    assert manifest["source_records"] == 11
    assert manifest["tool_version"] == __version__
    assert manifest["val_split"] == {"derived_from": None}
    assert manifest["skipped"] == []
    assert manifest["counts"] == {
        "train": {"identities": 3, "images": 5, "captions": 13},
        "val": {"identities": 2, "images": 3, "captions": 6},
        "test": {"identities": 2, "images": 3, "captions": 7},
        "total": {"identities": 7, "images": 11, "captions": 26},
    }
    assert manifest["schema"][0] == {"name": "split", "type": "string"}
    assert [c["name"] for c in manifest["schema"]] == SCHEMA.names
    assert manifest["content_hash"].startswith("sha256:") and len(manifest["content_hash"]) == 7 + 64
    # pids contiguous from 0 within each split, in order of the source id
    for split, ids in {"train": [3, 12, 40], "val": [5, 7], "test": [99, 101]}.items():
        sub = [r for r in got if r["split"] == split]
        assert sorted({r["pid"] for r in sub}) == list(range(len(ids)))
        assert {r["pid"]: r["orig_id"] for r in sub} == dict(enumerate(ids))
    assert sorted({r["image_id"] for r in got}) == list(range(11))
    assert not any(c.endswith((" ", "\n")) for c in table.column("caption").to_pylist())


def test_icfg_derived_val_is_identity_disjoint_and_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "ICFG"
    records = build_icfg(root, n_ids=20)
    m1 = prepare("icfg-pedes", root, tmp_path / "a", val_fraction=0.25, seed=3)
    m2 = prepare("icfg-pedes", root, tmp_path / "b", val_fraction=0.25, seed=3)
    t = ds.dataset(tmp_path / "a").to_table().to_pylist()

    ids = {s: {r["orig_id"] for r in t if r["split"] == s} for s in ("train", "val", "test")}
    assert ids["test"] == {17, 18, 19, 20}  # the source test split, untouched
    assert len(ids["val"]) == round(0.25 * 16) == 4
    assert ids["train"] | ids["val"] == set(range(1, 17))
    assert not ids["val"] & ids["train"] and not ids["val"] & ids["test"]
    assert m1["val_split"]["derived_from"] == "train"
    assert (m1["val_split"]["fraction"], m1["val_split"]["seed"], m1["val_split"]["identities"]) == (
        0.25,
        3,
        4,
    )
    assert m1["counts"]["val"] == {"identities": 4, "images": 8, "captions": 8}
    assert m1["content_hash"] == m2["content_hash"]

    # the rows are exactly the source records with train split into train/val
    val_ids = ids["val"]
    exp = expected_rows(records, "file_path", lambda r: "val" if r["id"] in val_ids else r["split"])
    assert [{k: v for k, v in r.items() if k != "image"} for r in t] == exp

    # another seed draws other identities (the draw is a fixed function of seed and id)
    m3 = prepare("icfg-pedes", root, tmp_path / "c", val_fraction=0.25, seed=4)
    other = {r["orig_id"] for r in load_split_table(tmp_path / "c", "val", ["orig_id"]).to_pylist()}
    assert len(other) == 4 and other != val_ids and m3["content_hash"] != m1["content_hash"]


def test_icfg_accepts_underscore_name_and_zero_fraction(tmp_path: Path) -> None:
    root = tmp_path / "ICFG"
    build_icfg(root, n_ids=6, name="ICFG_PEDES.json")
    m = prepare("icfg-pedes", root, tmp_path / "out", val_fraction=0.0)
    assert m["source_file"] == "ICFG_PEDES.json"
    assert m["counts"]["val"] == {"identities": 0, "images": 0, "captions": 0}
    assert m["counts"]["train"]["identities"] == 2 and m["counts"]["test"]["identities"] == 4
    assert load_split_table(tmp_path / "out", "val").num_rows == 0


def test_icfg_rejects_a_val_split_in_the_source(tmp_path: Path) -> None:
    root = tmp_path / "ICFG"
    records = build_icfg(root, n_ids=6)
    records[3]["split"] = "val"
    dump(root, "icfg-pedes", records)
    with pytest.raises(DataFormatError, match=r"record 3 .*field 'split': unknown split 'val'"):
        prepare("icfg-pedes", root, tmp_path / "out")


def test_rstpreid(tmp_path: Path) -> None:
    root, out = tmp_path / "RSTPReid", tmp_path / "out"
    records = build_rstp(root)
    m = prepare("rstpreid", root, out)
    t = ds.dataset(out).to_table()
    assert t.drop_columns(["image"]).to_pylist() == expected_rows(records, "img_path")
    assert t.column("image").to_pylist() == [
        (root / "imgs" / p).read_bytes() for p in t.column("image_path").to_pylist()
    ]
    assert m["counts"]["train"] == {"identities": 2, "images": 3, "captions": 6}
    assert m["counts"]["val"] == {"identities": 2, "images": 2, "captions": 4}
    assert m["counts"]["test"] == {"identities": 1, "images": 2, "captions": 4}


def test_repeated_record_of_one_image_pools_captions(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    records.append({**records[0], "captions": ["one more caption. "]})
    dump(root, "cuhk-pedes", records)
    prepare("cuhk-pedes", root, tmp_path / "out")
    rows = [
        r
        for r in load_split_table(
            tmp_path / "out", "train", ["image_path", "caption", "caption_index"]
        ).to_pylist()
    ]
    mine = [(r["caption_index"], r["caption"]) for r in rows if r["image_path"] == records[0]["file_path"]]
    assert mine == [
        (0, "person 12 image 0 caption 0."),
        (1, "person 12 image 0 caption 1."),
        (2, "one more caption."),
    ]


# --------------------------------------------------------------------------- shards, round trip, hash


def test_shard_size_and_split_purity(tmp_path: Path) -> None:
    root, out = tmp_path / "CUHK", tmp_path / "out"
    build_cuhk(root)
    m = prepare("cuhk-pedes", root, out, shard_rows=3)
    files = sorted(p.name for p in out.glob("*.parquet"))
    assert files == [s["file"] for s in m["shards"]]
    # train 13 rows -> 3+3+3+3+1, val 6 -> 3+3, test 7 -> 3+3+1
    assert [(s["split"], s["rows"]) for s in m["shards"]] == [("train", 3)] * 4 + [("train", 1)] + [
        ("val", 3)
    ] * 2 + [
        ("test", 3),
        ("test", 3),
        ("test", 1),
    ]
    for s in m["shards"]:
        t = pq.read_table(out / s["file"])
        assert t.num_rows == s["rows"] and set(t.column("split").to_pylist()) == {s["split"]}
        assert pq.ParquetFile(out / s["file"]).schema_arrow == SCHEMA


def test_parquet_round_trip_every_caption_and_image(tmp_path: Path) -> None:
    root, out = tmp_path / "CUHK", tmp_path / "out"
    records = build_cuhk(root)
    prepare("cuhk-pedes", root, out, shard_rows=5)
    t = ds.dataset(out).to_table()
    pairs = sorted(zip(t.column("image_path").to_pylist(), t.column("caption").to_pylist(), strict=True))
    assert pairs == sorted((r["file_path"], c.strip()) for r in records for c in r["captions"])
    by_path = dict(zip(t.column("image_path").to_pylist(), t.column("image").to_pylist(), strict=True))
    assert by_path == {r["file_path"]: (root / "imgs" / r["file_path"]).read_bytes() for r in records}


def test_content_hash_is_of_the_content(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    h = prepare("cuhk-pedes", root, tmp_path / "o1", shard_rows=4)["content_hash"]
    assert prepare("cuhk-pedes", root, tmp_path / "o2", shard_rows=4)["content_hash"] == h
    assert (
        prepare("cuhk-pedes", root, tmp_path / "o3", shard_rows=100)["content_hash"] == h
    )  # not the sharding
    manifests = [json.loads((tmp_path / o / MANIFEST_NAME).read_text()) for o in ("o1", "o2")]
    assert manifests[0] == manifests[1]  # the whole manifest is deterministic, not only the hash
    assert [p.read_bytes() for p in sorted((tmp_path / "o1").glob("*.parquet"))] == [
        p.read_bytes() for p in sorted((tmp_path / "o2").glob("*.parquet"))
    ]
    shuffled = json.loads(json.dumps(records))
    random.Random(0).shuffle(shuffled)
    dump(root, "cuhk-pedes", shuffled)  # record order does not matter: rows are sorted
    assert prepare("cuhk-pedes", root, tmp_path / "o4")["content_hash"] == h
    shuffled[0]["captions"][0] += " Extra."
    dump(root, "cuhk-pedes", shuffled)
    assert prepare("cuhk-pedes", root, tmp_path / "o5")["content_hash"] != h
    relabelled = json.loads(json.dumps(records))
    for r in relabelled:
        r["id"] = 41 if r["id"] == 40 else r["id"]  # same pids, same images, another source id
    dump(root, "cuhk-pedes", relabelled)
    assert prepare("cuhk-pedes", root, tmp_path / "o6")["content_hash"] != h
    dump(root, "cuhk-pedes", records)
    make_image(root / "imgs" / records[4]["file_path"], 999, "PNG")  # one image's bytes change
    assert prepare("cuhk-pedes", root, tmp_path / "o7")["content_hash"] != h


# --------------------------------------------------------------------------- bad input


def _truncate(root: Path, rec: dict[str, Any]) -> None:
    """Cut a JPEG in the middle of its entropy-coded data: headers intact, pixels missing."""
    p = root / "imgs" / rec["file_path"]
    data = p.read_bytes()
    sos = data.index(b"\xff\xda")  # start of scan: everything before it is header
    p.write_bytes(data[: sos + (len(data) - sos) // 2])


# name -> (mutation of the CUHK records/files at record index 2, field named, words in the reason)
BAD_CASES: dict[str, tuple[Any, str, str]] = {
    "missing image": (lambda root, r: (root / "imgs" / r["file_path"]).unlink(), "file_path", "not found"),
    "unreadable image": (
        lambda root, r: (root / "imgs" / r["file_path"]).write_bytes(b"not an image"),
        "file_path",
        "not a recognised image",
    ),
    "image is a folder": (
        lambda root, r: ((root / "imgs" / r["file_path"]).unlink(), (root / "imgs" / r["file_path"]).mkdir()),
        "file_path",
        "is a folder",
    ),
    "truncated image": (_truncate, "file_path", "truncated"),
    "empty caption": (lambda root, r: r["captions"].__setitem__(1, " \n"), "captions[1]", "empty caption"),
    "invisible caption": (
        lambda root, r: r["captions"].__setitem__(0, "\u200b\u200d\ufeff \u3164"),
        "captions[0]",
        "empty caption",
    ),
    "empty caption list": (lambda root, r: r.__setitem__("captions", []), "captions", "empty caption list"),
    "id beyond int64": (lambda root, r: r.__setitem__("id", 2**63), "id", "does not fit in int64"),
    "unknown split": (lambda root, r: r.__setitem__("split", "dev"), "split", "unknown split 'dev'"),
    "missing field": (lambda root, r: r.pop("split"), "split", "missing field"),
    "id as string": (lambda root, r: r.__setitem__("id", "3"), "id", "expected int, got string"),
    "captions as string": (
        lambda root, r: r.__setitem__("captions", "a man."),
        "captions",
        "expected a list of strings",
    ),
    "caption not a string": (
        lambda root, r: r["captions"].__setitem__(0, 5),
        "captions[0]",
        "expected string, got int",
    ),
    "two ids for one path": (
        lambda root, r: r.__setitem__("file_path", "Market/0003_c1_01.jpg"),
        "id",
        "already belongs to id 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_record_strict_names_index_path_field_and_writes_nothing(tmp_path: Path, case: str) -> None:
    root, out = tmp_path / "CUHK", tmp_path / "out"
    records = build_cuhk(root)
    mutate, fname, words = BAD_CASES[case]
    records[2]["id"] = 77 if case == "two ids for one path" else records[2]["id"]
    path = records[2]["file_path"] if case != "two ids for one path" else "Market/0003_c1_01.jpg"
    mutate(root, records[2])
    dump(root, "cuhk-pedes", records)
    with pytest.raises(DataFormatError) as ei:
        prepare("cuhk-pedes", root, out)
    msg = str(ei.value)
    assert str(root / "reid_raw.json") in msg
    assert f"record 2 (path {path!r}): field {fname!r}" in msg
    assert words in msg
    assert "record 0 " not in msg and "record 3 " not in msg  # only the bad one is reported
    no_leftovers(out)


def test_record_not_an_object_and_path_unknown(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    records[1] = ["not", "a", "record"]
    records[4]["file_path"] = 17
    dump(root, "cuhk-pedes", records)
    with pytest.raises(DataFormatError) as ei:
        prepare("cuhk-pedes", root, tmp_path / "out")
    assert "record 1 (path unknown): field '<record>': wrong type: expected an object, got list" in str(
        ei.value
    )
    assert "record 4 (path unknown): field 'file_path': wrong type: expected string, got int" in str(ei.value)


def test_path_outside_the_image_folder_is_rejected(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    records[0]["file_path"] = "../reid_raw.json"
    dump(root, "cuhk-pedes", records)
    with pytest.raises(
        DataFormatError,
        match=r"record 0 \(path '\.\./reid_raw\.json'\): field 'file_path': image path must be relative",
    ):
        prepare("cuhk-pedes", root, tmp_path / "out")


def test_all_errors_reported_at_once_capped_at_20(tmp_path: Path) -> None:
    root = tmp_path / "ICFG"
    records = build_icfg(root, n_ids=14)  # 28 records
    for r in records[:25]:
        r["captions"] = []
    dump(root, "icfg-pedes", records)
    with pytest.raises(DataFormatError) as ei:
        prepare("icfg-pedes", root, tmp_path / "out")
    msg = str(ei.value)
    assert "25 bad record(s)" in msg
    assert all(f"record {i} (" in msg for i in range(20)) and "record 20 (" not in msg
    assert "... and 5 more problem(s)" in msg
    no_leftovers(tmp_path / "out")


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    root = tmp_path / "RSTP"
    build_rstp(root)
    (root / "data_captions.json").write_text('[\n  {"id": 1,\n   "img_path": "a.jpg" "captions": []}\n]')
    with pytest.raises(DataFormatError) as ei:
        prepare("rstpreid", root, tmp_path / "out")
    assert str(root / "data_captions.json") in str(ei.value)
    assert "invalid JSON at line 3, column 24" in str(ei.value)
    no_leftovers(tmp_path / "out")


def test_missing_annotation_file_and_root_and_wrong_top_level(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"ICFG-PEDES\.json or .*ICFG_PEDES\.json"):
        prepare("icfg-pedes", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataFormatError, match="not a folder"):
        prepare("cuhk-pedes", tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty" / "reid_raw.json").write_text('{"records": []}')
    with pytest.raises(DataFormatError, match="expected a JSON list of records at the top level, got object"):
        prepare("cuhk-pedes", tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DataFormatError, match="unknown format 'market'"):
        prepare("market", tmp_path / "empty", tmp_path / "out")
    no_leftovers(tmp_path / "out")


def test_rstp_bad_fields_use_img_path(tmp_path: Path) -> None:
    root = tmp_path / "RSTP"
    records = build_rstp(root)
    (root / "imgs" / records[5]["img_path"]).unlink()
    dump(root, "rstpreid", records)
    with pytest.raises(
        DataFormatError,
        match=rf"record 5 \(path '{records[5]['img_path']}'\): field 'img_path': image file not found",
    ):
        prepare("rstpreid", root, tmp_path / "out")


def test_skip_bad_lists_skipped_records_in_manifest(tmp_path: Path) -> None:
    root, out = tmp_path / "CUHK", tmp_path / "out"
    records = build_cuhk(root)
    _truncate(root, records[1])
    records[6]["captions"] = []
    records[6]["id"] = "5"
    records[9]["file_path"] = records[8]["file_path"]  # id 99 claims id 101's image
    dump(root, "cuhk-pedes", records)
    m = prepare("cuhk-pedes", root, out, skip_bad=True)
    assert [(s["index"], s["path"], s["field"]) for s in m["skipped"]] == [
        (1, "Market/0003_c1_01.jpg", "file_path"),
        (6, "test_query/p5_s1.jpg", "id"),
        (9, "VIPER/101_a.jpg", "id"),
    ]
    assert "truncated" in m["skipped"][0]["reason"]
    assert [e["field"] for e in m["skipped"][1]["errors"]] == ["id", "captions"]
    assert json.loads((out / MANIFEST_NAME).read_text())["skipped"] == m["skipped"]
    kept = [r for i, r in enumerate(records) if i not in (1, 6, 9)]
    got = ds.dataset(out).to_table().drop_columns(["image"]).to_pylist()
    assert got == expected_rows(kept, "file_path")
    assert m["counts"]["total"] == {"identities": 7, "images": 8, "captions": 19}


def test_skip_bad_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "RSTP"
    records = build_rstp(root)
    for r in records:
        r["split"] = "gallery"
    dump(root, "rstpreid", records)
    with pytest.raises(DataFormatError, match="no valid records left"):
        prepare("rstpreid", root, tmp_path / "out", skip_bad=True)
    no_leftovers(tmp_path / "out")


def test_existing_output_refused_unless_overwrite(tmp_path: Path) -> None:
    root, out = tmp_path / "RSTP", tmp_path / "out"
    build_rstp(root)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(DataFormatError, match="exists and is not empty"):
        prepare("rstpreid", root, out)
    assert (out / "keep.txt").read_text() == "mine"
    m = prepare("rstpreid", root, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_NAME] + [s["file"] for s in m["shards"]]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == ["out"]
    (tmp_path / "empty_out").mkdir()
    prepare("rstpreid", root, tmp_path / "empty_out")  # an empty folder is fine
    assert (tmp_path / "empty_out" / MANIFEST_NAME).is_file()


def test_bad_arguments(tmp_path: Path) -> None:
    root = tmp_path / "RSTP"
    build_rstp(root)
    with pytest.raises(DataFormatError, match="shard_rows"):
        prepare("rstpreid", root, tmp_path / "out", shard_rows=0)
    with pytest.raises(DataFormatError, match="val_fraction"):
        prepare("icfg-pedes", root, tmp_path / "out", val_fraction=1.0)


def test_truncated_image_passes_header_check_but_not_prepare(tmp_path: Path) -> None:
    """The fixture is a real truncation: PIL's header-only verify() accepts it."""
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    for i in (0, 1, 2):  # the records the other tests truncate
        _truncate(root, records[i])
        with Image.open(root / "imgs" / records[i]["file_path"]) as im:
            im.verify()
    png = root / "imgs" / records[4]["file_path"]
    png.write_bytes(png.read_bytes()[:-200])  # cut inside the IDAT data
    with pytest.raises(DataFormatError) as ei:
        prepare("cuhk-pedes", root, tmp_path / "out")
    for i in (0, 1, 2, 4):
        assert f"record {i} (path {records[i]['file_path']!r}): field 'file_path': truncated" in str(ei.value)
    no_leftovers(tmp_path / "out")


# --------------------------------------------------------------------------- readers


def test_readers_local_and_uri(tmp_path: Path) -> None:
    root, out = tmp_path / "CUHK", tmp_path / "out"
    records = build_cuhk(root)
    m = prepare("cuhk-pedes", root, out, shard_rows=4)
    assert read_manifest(out) == m
    assert read_manifest(out.as_uri()) == m
    assert read_manifest(str(out)) == m

    exp = expected_rows(records, "file_path")
    d = open_dataset(out.as_uri())
    assert d.schema == SCHEMA
    assert d.to_table().drop_columns(["image"]).to_pylist() == exp
    for split in ("train", "val", "test"):
        t = load_split_table(out, split, columns=["pid", "image_path", "caption"])
        assert t.column_names == ["pid", "image_path", "caption"]
        assert t.to_pylist() == [
            {k: r[k] for k in ("pid", "image_path", "caption")} for r in exp if r["split"] == split
        ]
    full = load_split_table(out.as_uri(), "test")
    assert full.schema == SCHEMA and full.num_rows == 7
    with pytest.raises(ValueError, match="unknown split"):
        load_split_table(out, "dev")
    with pytest.raises(ValueError, match="unknown column"):
        load_split_table(out, "train", columns=["pixels"])


def test_readers_name_a_missing_or_incomplete_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotPreparedError, match=str(tmp_path / "nothing")):
        read_manifest(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="tpr data prepare"):
        open_dataset(tmp_path / "nothing")
    root, out = tmp_path / "RSTP", tmp_path / "out"
    build_rstp(root)
    m = prepare("rstpreid", root, out)
    (out / m["shards"][-1]["file"]).unlink()
    with pytest.raises(DatasetNotPreparedError, match="incomplete: missing .*part-00002.parquet"):
        load_split_table(out, "test")
    load_split_table(out, "train")  # other splits' shards are still there
    (out / MANIFEST_NAME).write_text('{"manifest_version": 99}')
    with pytest.raises(DataFormatError, match="manifest_version 99"):
        read_manifest(out)


def test_blank_text_is_what_shows_nothing() -> None:
    from tpr_core.data.text import is_blank

    assert is_blank("") and is_blank(" \n\t") and is_blank("\u200b\u200c\u200d\u2060\ufeff\u00ad\u3164\u2800")
    assert not is_blank("a") and not is_blank("\u200ba\u200b") and not is_blank("人") and not is_blank(".")


def test_json_nested_too_deep_is_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    build_cuhk(root)
    (root / "reid_raw.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataFormatError, match=r"reid_raw\.json: JSON nested too deeply"):
        prepare("cuhk-pedes", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_unwritable_out_is_refused_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    dump(root, "cuhk-pedes", build_cuhk(root))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DataFormatError, match=rf"cannot write the prepared dataset to {blocker}/out"):
        prepare("cuhk-pedes", root, blocker / "out")


def test_a_full_disk_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    root, out = tmp_path / "CUHK", tmp_path / "out"
    dump(root, "cuhk-pedes", build_cuhk(root))

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(out) + ".tmp-1/part-0.parquet")

    monkeypatch.setattr(pq, "write_table", full)
    with pytest.raises(DataFormatError, match=rf"cannot write the prepared dataset to {out} .*No space left on device"):
        prepare("cuhk-pedes", root, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CUHK"]


def test_a_nul_in_a_path_is_a_bad_record_not_a_traceback(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    records[2]["file_path"] = "a\x00b.jpg"
    dump(root, "cuhk-pedes", records)
    with pytest.raises(DataFormatError, match=r"record 2 \(path 'a\\x00b\.jpg'\): field 'file_path': .*NUL character"):
        prepare("cuhk-pedes", root, tmp_path / "out")
    no_leftovers(tmp_path / "out")


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    # A 12,500 x 12,000 PNG of one colour: about 150 kB on disk, 450 MB decoded.
    big = root / "imgs" / records[2]["file_path"]
    Image.new("RGB", (12_500, 12_000)).save(big.with_suffix(".png"), format="PNG")
    big.unlink()
    records[2]["file_path"] = str(Path(records[2]["file_path"]).with_suffix(".png"))
    dump(root, "cuhk-pedes", records)
    with pytest.raises(DataFormatError, match=r"record 2 .*image of 12500x12000 pixels is over the limit of 4194304"):
        prepare("cuhk-pedes", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_pixel_limit_is_the_callers(tmp_path: Path) -> None:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    wide = root / "imgs" / records[2]["file_path"]
    Image.new("RGB", (2100, 2100)).save(wide, format="JPEG")  # 4.4 MP: over the default
    dump(root, "cuhk-pedes", records)
    with pytest.raises(DataFormatError, match=r"image of 2100x2100 pixels is over the limit"):
        prepare("cuhk-pedes", root, tmp_path / "out")
    prepare("cuhk-pedes", root, tmp_path / "out", max_pixels=2100 * 2100)
    assert (tmp_path / "out" / "_manifest.json").is_file()


def _leak_case(tmp_path: Path, change) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path / "CUHK"
    records = build_cuhk(root)
    change(root, records)
    dump(root, "cuhk-pedes", records)
    return root, records


@pytest.mark.parametrize("spelling", ["./Market/0003_c1_01.jpg", "Market//0003_c1_01.jpg", "Market/./0003_c1_01.jpg"])
def test_one_file_spelled_two_ways_cannot_join_two_identities(tmp_path: Path, spelling: str) -> None:
    def change(root: Path, records: list[dict[str, Any]]) -> None:
        records.append({**records[1], "file_path": spelling, "id": 77})  # record 11: Market/0003_c1_01.jpg again

    root, _ = _leak_case(tmp_path, change)
    with pytest.raises(DataFormatError, match=r"record 11 \(path 'Market/0003_c1_01\.jpg'\): field 'id': "
                       r"image already belongs to id 3 \(record 1\); this record says 77"):
        prepare("cuhk-pedes", root, tmp_path / "out")


def test_the_same_bytes_under_two_splits_or_ids_are_refused_or_skipped(tmp_path: Path) -> None:
    def change(root: Path, records: list[dict[str, Any]]) -> None:
        # a copy of a train image (record 1) filed as a test image of another person
        (root / "imgs" / "VIPER" / "copy.jpg").write_bytes((root / "imgs" / records[1]["file_path"]).read_bytes())
        records.append({**records[8], "file_path": "VIPER/copy.jpg"})  # record 11, id 101, test

    root, _ = _leak_case(tmp_path, change)
    with pytest.raises(DataFormatError, match=r"record 11 \(path 'VIPER/copy\.jpg'\): field 'id': an image with the same bytes "
                       r"already belongs to id 3 \(record 1, path 'Market/0003_c1_01\.jpg'\); this record says 101"):
        prepare("cuhk-pedes", root, tmp_path / "out")
    manifest = prepare("cuhk-pedes", root, tmp_path / "out", skip_bad=True)
    assert [s["index"] for s in manifest["skipped"]] == [11]


def test_an_exact_duplicate_record_is_merged_and_counted(tmp_path: Path) -> None:
    root, records = _leak_case(tmp_path, lambda root, records: records.insert(5, dict(records[2])))
    manifest = prepare("cuhk-pedes", root, tmp_path / "out")
    assert manifest["duplicate_records"] == {"count": 1, "records": [5]}
    captions = ds.dataset(tmp_path / "out").to_table(columns=["caption"]).column("caption").to_pylist()
    assert len(captions) == sum(len(r["captions"]) for r in records) - len(records[5]["captions"])


def test_a_symlink_out_of_the_dataset_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.jpg"
    make_image(outside, 99, "JPEG")

    def change(root: Path, records: list[dict[str, Any]]) -> None:
        (root / "imgs" / "CUHK03" / "12_1.jpg").unlink()
        (root / "imgs" / "CUHK03" / "12_1.jpg").symlink_to(outside)

    root, _ = _leak_case(tmp_path, change)
    with pytest.raises(DataFormatError, match=r"record 0 \(path 'CUHK03/12_1\.jpg'\): field 'file_path': image path "
                       r"leads outside the dataset folder .*\(a symlink to .*secret\.jpg\)"):
        prepare("cuhk-pedes", root, tmp_path / "out")
