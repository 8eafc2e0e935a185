"""``tpr index`` and ``tpr search --index``: a trained tiny model's index of a folder of
synthetic images, searched by text, by image and (over captions) image -> text; a SIGKILLed
index run resumed; an index of another model refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import typer
from typer.testing import CliRunner

from pipelines import index_cli, registry_cli
from tests.pipelines import registry_fixtures as fx
from tpr_core.export import load_exported
from tpr_core.index import embed_image_file, embed_images, embed_texts, load_index, search_index

TPR = "import sys; from pipelines.cli import main; sys.argv[0] = 'tpr'; main()"


def _cli(*args: str):
    app = typer.Typer()
    registry_cli.register(app)
    index_cli.register(app)
    return CliRunner().invoke(app, [str(a) for a in args])


def _flat(text: str) -> str:
    """Output without whitespace: rich wraps and folds long paths at the terminal width."""
    return "".join(text.split())


@pytest.fixture(scope="module")
def trained():
    return fx.exported_model("trained")


@pytest.fixture(scope="module")
def folder_index(trained, tmp_path_factory):
    """An index of the val split's 18 images as a plain folder, made by ``tpr index``."""
    folder, _ = fx.val_images()
    out = tmp_path_factory.mktemp("index") / "val"
    res = _cli("index", "--model", trained, "--images", folder, "--out", out, "--part-rows", "5")
    assert res.exit_code == 0, res.output
    return out


def test_the_index_holds_every_image_once_with_its_model_on_record(folder_index, trained):
    folder, person = fx.val_images()
    meta = json.loads((folder_index / "_index.json").read_text())
    ex = load_exported(trained)
    assert meta["complete"] and meta["rows"] == 18 and meta["kind"] == "image"
    assert meta["model"] == str(Path(trained).resolve()) and meta["weights_sha256"] == ex.info["weights_sha256"]
    assert len(list(folder_index.glob("part-*.parquet"))) == 4  # 18 rows, 5 a part
    idx = load_index(folder_index)
    assert sorted(idx.paths) == sorted(person)
    # The stored embeddings are the model's, through the evaluation transform.
    fresh = torch.cat([embed_image_file(ex, Path(folder) / p) for p in idx.paths])
    torch.testing.assert_close(idx.embeddings, fresh, atol=1e-5, rtol=0)


def test_text_and_image_queries_rank_the_person_first(folder_index, trained):
    """Fresh descriptions of the 9 val people (not dataset captions) and each of the 18 images
    find the right person at rank 1 far above chance (text: 2 of 18 images are the person's;
    image: 1 of the 17 other images)."""
    folder, person = fx.val_images()
    ex, idx = load_exported(trained), load_index(folder_index)
    people = sorted(set(person.values()))
    text_hits = search_index(idx, embed_texts(ex, [fx.describe_identity(p) for p in people]), 1)
    text_r1 = sum(person[h[0]["path"]] == p for h, p in zip(text_hits, people, strict=True)) / len(people)
    paths = sorted(person)
    image_hits = search_index(idx, torch.cat([embed_image_file(ex, Path(folder) / p) for p in paths]), 2)
    assert all(h[0]["path"] == p for h, p in zip(image_hits, paths, strict=True))  # itself, score 1
    image_r1 = sum(person[h[1]["path"]] == person[p] for h, p in zip(image_hits, paths, strict=True)) / len(paths)
    print(f"text->image R1 {text_r1:.2f} (chance {2 / 18:.2f}); image->image R1 {image_r1:.2f} (chance {1 / 17:.2f})")
    assert text_r1 >= 3 * 2 / 18
    assert image_r1 >= 3 * 1 / 17

    # The command prints the same ranking.
    res = _cli("search", fx.describe_identity(people[0]), "--index", folder_index, "--top-k", "3", "--format", "json")
    assert res.exit_code == 0, res.output
    assert [h["path"] for h in json.loads(res.output)] == [h["path"] for h in search_index(
        idx, embed_texts(ex, [fx.describe_identity(people[0])]), 3)[0]]  # fmt: skip
    res = _cli("search", "--image", Path(folder) / paths[3], "--index", folder_index, "--model", trained,
               "--top-k", "2", "--format", "json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert [h["path"] for h in json.loads(res.output)] == [h["path"] for h in image_hits[3]]


def test_an_index_of_captions_answers_image_queries(trained, tmp_path):
    """``--captions`` over the prepared val split: each image's top caption is its person's
    far above chance (4 of 36 captions)."""
    out = tmp_path / "captions"
    res = _cli("index", "--model", trained, "--images", fx.dataset()["root"], "--split", fx.SPLIT, "--captions",
               "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    idx = load_index(out)
    assert idx.kind == "caption" and len(idx) == 36 and idx.captions is not None
    folder, person = fx.val_images()
    ex = load_exported(trained)
    paths = sorted(person)
    hits = search_index(idx, torch.cat([embed_image_file(ex, Path(folder) / p) for p in paths]), 1)
    r1 = sum(h[0]["person"] == person[p] for h, p in zip(hits, paths, strict=True)) / len(paths)
    print(f"image->text R1 {r1:.2f} (chance {4 / 36:.2f})")
    assert r1 >= 3 * 4 / 36
    res = _cli("search", "a man", "--index", out)
    assert res.exit_code == 2 and "holdscaptions" in _flat(res.output)


def test_an_index_of_another_model_is_refused_by_name(folder_index, trained):
    other = fx.exported_model("untrained")
    parts = {p: p.stat().st_mtime_ns for p in folder_index.glob("part-*.parquet")}
    for args in (
        ("index", "--model", other, "--images", fx.val_images()[0], "--out", folder_index),
        ("search", "a man in a red coat", "--index", folder_index, "--model", other),
    ):
        res = _cli(*args)
        said = _flat(res.output)
        assert res.exit_code == 2, res.output
        assert _flat(str(Path(trained).resolve())) in said and _flat(str(Path(other).resolve())) in said
    assert {p: p.stat().st_mtime_ns for p in folder_index.glob("part-*.parquet")} == parts


def test_a_bad_image_is_named_and_nothing_written_unless_skipped(tmp_path):
    folder, person = fx.val_images()
    mine = tmp_path / "mine"
    mine.mkdir()
    good = sorted(person)[0]
    (mine / "good.jpg").write_bytes((Path(folder) / good).read_bytes())
    (mine / "broken.jpg").write_bytes((Path(folder) / good).read_bytes()[:200])  # truncated
    res = _cli("index", "--model", fx.exported_model("trained"), "--images", mine, "--out", tmp_path / "idx")
    assert res.exit_code == 2 and "broken.jpg" in _flat(res.output)
    assert not (tmp_path / "idx").exists()
    res = _cli("index", "--model", fx.exported_model("trained"), "--images", mine, "--out", tmp_path / "idx",
               "--skip-bad")  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "idx" / "_index.json").read_text())
    assert meta["rows"] == 1 and [s["path"] for s in meta["skipped"]] == ["broken.jpg"]


def test_a_killed_index_run_resumes_without_duplicates(trained, tmp_path):
    """SIGKILL a real ``tpr index`` once its first part is written; the next run keeps that
    part as it is, adds only the rest, and every image is in the index exactly once."""
    images = Path(fx.dataset()["raw"]) / "imgs"
    every = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg"))
    out = tmp_path / "index"
    args = ["index", "--model", trained, "--images", str(images), "--out", str(out), "--part-rows", "2",
            "--batch-size", "2"]  # fmt: skip
    with open(tmp_path / "index.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", TPR, *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=fx.REPO, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while not list(out.glob("part-*.parquet")):
                assert proc.poll() is None, (tmp_path / "index.log").read_text()[-2000:]
                assert time.monotonic() < deadline
                time.sleep(0.005)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(first) < len(every) // 2, len(first)
    assert not json.loads((out / "_index.json").read_text())["complete"]
    res = _cli("search", "a man", "--index", out)
    assert res.exit_code == 2 and "incomplete" in res.output

    res = _cli(*args)
    assert res.exit_code == 0, res.output
    assert f"{2 * len(first)}alreadythere" in _flat(res.output)
    assert {p: p.stat().st_mtime_ns for p in first} == first  # kept, not rewritten
    paths = pq.read_table(out, columns=["path"]).column("path").to_pylist()
    assert len(paths) == len(set(paths)) and sorted(paths) == every
    meta = json.loads((out / "_index.json").read_text())
    assert meta["complete"] and meta["rows"] == len(every)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    # A third run has nothing to do.
    res = _cli(*args)
    assert res.exit_code == 0 and f"0added,{len(every)}alreadythere" in _flat(res.output)


def test_embeddings_are_normalised_and_batch_independent(trained):
    """One image alone or in a batch of 4 gets the same unit embedding (eval mode, no batch statistics)."""
    folder, person = fx.val_images()
    ex = load_exported(trained)
    from tpr_core.index import decode_for_model

    imgs = [decode_for_model((Path(folder) / p).read_bytes(), p, ex.cfg.model.image_size, 10**6)
            for p in sorted(person)[:4]]  # fmt: skip
    batch = embed_images(ex, imgs)
    torch.testing.assert_close(batch.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(embed_images(ex, imgs[2:3])[0], batch[2], atol=1e-5, rtol=0)
