"""`tpr data prepare` through the real CLI app: exit codes, messages, output folder."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import typer
from typer.testing import CliRunner

from pipelines.cli import app
from tests.tpr_core.test_prepare import build_cuhk, build_icfg, build_rstp, dump
from tpr_core.data.formats import FORMATS
from tpr_core.data.store import MANIFEST_NAME

runner = CliRunner()


def _squash(text: str) -> str:
    # rich wraps long lines at the terminal width; compare without whitespace
    return "".join(text.split())


def _prepare(*args: str):
    return runner.invoke(app, ["data", "prepare", *args])


def test_prepare_each_format_exit_zero(tmp_path: Path) -> None:
    for fmt, build, n_rows in (
        ("cuhk-pedes", build_cuhk, 26),
        ("icfg-pedes", build_icfg, 40),
        ("rstpreid", build_rstp, 14),
    ):
        root, out = tmp_path / f"raw-{fmt}", tmp_path / f"out-{fmt}"
        build(root)
        res = _prepare("--format", fmt, "--root", str(root), "--out", str(out), "--shard-rows", "8")
        assert res.exit_code == 0, res.output
        assert f"wrote {out}" in " ".join(res.output.split()) or _squash(f"wrote {out}") in _squash(
            res.output
        )
        assert ds.dataset(out).to_table().num_rows == n_rows
        m = json.loads((out / MANIFEST_NAME).read_text())
        assert m["source_format"] == fmt and all(s["rows"] <= 8 for s in m["shards"])
        total = m["counts"]["total"]  # the summary table's last row: identities, images, captions
        assert _squash(f"│total│{total['identities']}│{total['images']}│{total['captions']}│") in _squash(res.output)
        assert total["captions"] == n_rows


def test_icfg_val_options_reach_prepare(tmp_path: Path) -> None:
    root, out = tmp_path / "raw", tmp_path / "out"
    build_icfg(root, n_ids=20)
    res = _prepare(
        "--format",
        "icfg-pedes",
        "--root",
        str(root),
        "--out",
        str(out),
        "--val-fraction",
        "0.5",
        "--seed",
        "7",
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["val_split"]["fraction"] == 0.5 and m["val_split"]["seed"] == 7
    assert m["counts"]["val"]["identities"] == 8  # half of the 16 train identities


def test_bad_record_exits_nonzero_names_record_path_field_and_writes_nothing(tmp_path: Path) -> None:
    root, out = tmp_path / "raw", tmp_path / "out"
    records = build_cuhk(root)
    records[4]["captions"] = []
    records[7]["split"] = "dev"
    dump(root, "cuhk-pedes", records)
    res = _prepare("--format", "cuhk-pedes", "--root", str(root), "--out", str(out))
    assert res.exit_code == 2
    got = _squash(res.output)
    assert _squash(str(root / "reid_raw.json")) in got
    assert _squash("record 4 (path 'CUHK01/0040001.png'): field 'captions': empty caption list") in got
    assert _squash("record 7 (path 'test_query/p5_s2.jpg'): field 'split': unknown split 'dev'") in got
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_truncated_image_and_invalid_json_fail_cleanly(tmp_path: Path) -> None:
    root, out = tmp_path / "raw", tmp_path / "out"
    records = build_rstp(root)
    img = root / "imgs" / records[3]["img_path"]
    img.write_bytes(img.read_bytes()[:-40])
    res = _prepare("--format", "rstpreid", "--root", str(root), "--out", str(out))
    assert res.exit_code == 2
    assert _squash(f"record 3 (path '{records[3]['img_path']}'): field 'img_path': truncated") in _squash(
        res.output
    )
    assert not out.exists()

    (root / "data_captions.json").write_text('[{"id": 1,}]')
    res = _prepare("--format", "rstpreid", "--root", str(root), "--out", str(out))
    assert res.exit_code == 2
    assert _squash("invalid JSON at line 1, column 11") in _squash(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_skip_bad_exit_zero_and_lists_records(tmp_path: Path) -> None:
    root, out = tmp_path / "raw", tmp_path / "out"
    records = build_cuhk(root)
    (root / "imgs" / records[0]["file_path"]).unlink()
    records[5]["id"] = "7"
    dump(root, "cuhk-pedes", records)
    res = _prepare("--format", "cuhk-pedes", "--root", str(root), "--out", str(out), "--skip-bad")
    assert res.exit_code == 0, res.output
    assert "skipped 2 bad records" in " ".join(res.output.split())
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert [(s["index"], s["path"], s["field"]) for s in m["skipped"]] == [
        (0, "CUHK03/12_1.jpg", "file_path"),
        (5, "test_query/p7_s1.jpg", "id"),
    ]
    assert ds.dataset(out).to_table().num_rows == 26 - 2 - 2


def test_unknown_format_and_missing_root(tmp_path: Path) -> None:
    res = _prepare("--format", "market1501", "--root", str(tmp_path), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and _squash("'market1501' is not one of") in _squash(res.output)
    res = _prepare("--format", "rstpreid", "--root", str(tmp_path / "absent"), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and _squash(str(tmp_path / "absent")) in _squash(res.output)
    assert not (tmp_path / "out").exists()


def test_format_help_and_unknown_format_come_from_the_formats_table(tmp_path: Path) -> None:
    prepare_cmd = typer.main.get_command(app).commands["data"].commands["prepare"]
    (fmt_option,) = [p for p in prepare_cmd.params if p.name == "fmt"]
    assert typing.get_args(fmt_option.type_descriptor.annotation) == tuple(FORMATS)
    res = runner.invoke(app, ["data", "prepare", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--format" in res.output and "cuhk-pedes|icfg-pedes|rstpreid" in res.output
    args = ["data", "prepare", "--format", "market", "--root", str(tmp_path), "--out", str(tmp_path / "out")]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 2
    assert _squash(f"'market' is not one of {', '.join(repr(f) for f in FORMATS)}") in _squash(res.output)
    assert not (tmp_path / "out").exists()


def _symlink_out(root: Path, records: list[dict]) -> None:
    outside = root.parent / "secret.jpg"
    outside.write_bytes((root / "imgs" / records[1]["file_path"]).read_bytes())
    (root / "imgs" / records[0]["file_path"]).unlink()
    (root / "imgs" / records[0]["file_path"]).symlink_to(outside)


_REFUSALS = {  # what the record change is, and what the one-line message must say
    "id beyond int64": (lambda root, r: r[3].__setitem__("id", 2**63), [], "record 3", "does not fit in int64"),
    "NUL in a path": (lambda root, r: r[2].__setitem__("file_path", "a\x00b.jpg"), [], "record 2", "NUL character"),
    "symlink out of the dataset": (_symlink_out, [], "record 0", "leads outside the dataset folder"),
    "image over --max-pixels": (lambda root, r: None, ["--max-pixels", "100"], "record 0", "over the limit of 100"),
    "invisible caption": (lambda root, r: r[6].__setitem__("captions", ["\u200b\u2060 \u200c"]), [], "record 6", "empty"),
}


@pytest.mark.parametrize("case", list(_REFUSALS))
def test_prepare_refusals_exit_two_in_one_line_and_write_nothing(tmp_path: Path, case: str) -> None:
    """The bad inputs of #18 through the real CLI: exit 2, one line naming the record, no traceback."""
    change, flags, record, says = _REFUSALS[case]
    root, out = tmp_path / "raw", tmp_path / "out"
    records = build_cuhk(root)
    change(root, records)
    dump(root, "cuhk-pedes", records)
    res = _prepare("--format", "cuhk-pedes", "--root", str(root), "--out", str(out), *flags)
    assert res.exit_code == 2, res.output
    assert _squash(record) in _squash(res.output) and _squash(says) in _squash(res.output)
    assert "Traceback" not in res.output and isinstance(res.exception, (SystemExit, type(None)))
    assert not out.exists() and not list(tmp_path.glob("out.tmp*"))


def test_prepare_refuses_deep_json_and_an_unwritable_out_by_name(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    dump(root, "cuhk-pedes", build_cuhk(root))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = _prepare("--format", "cuhk-pedes", "--root", str(root), "--out", str(blocker / "out"))
    assert res.exit_code == 2 and _squash(f"cannot write the prepared dataset to {blocker}/out") in _squash(res.output)
    (root / "reid_raw.json").write_text("[" * 100_000 + "]" * 100_000)
    res = _prepare("--format", "cuhk-pedes", "--root", str(root), "--out", str(tmp_path / "out"))
    assert res.exit_code == 2 and _squash("reid_raw.json: JSON nested too deeply") in _squash(res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "raw"]


def test_synth_ends_with_a_table_of_its_splits(tmp_path: Path) -> None:
    """`tpr data synth` prints identities / images / captions per split and their total (#19), the
    counts of the reid_raw.json it wrote; a second call with the same parameters says it reused it."""
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--identities", "6", "--images-per-identity", "2",
            "--captions-per-image", "1", "--size", "32x16"]
    res = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    records = json.loads((out / "reid_raw.json").read_text())
    for split in ("train", "val", "test"):
        rows = [r for r in records if r["split"] == split]
        ids, captions = len({r["id"] for r in rows}), sum(len(r["captions"]) for r in rows)
        assert _squash(f"│{split}│{ids}│{len(rows)}│{captions}│") in _squash(res.output), (split, res.output)
    assert _squash("│total│6│12│12│") in _squash(res.output) and len(records) == 12
    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0 and _squash("(reused: same parameters)") in _squash(again.output)
