"""The registered retrieval model: in-process predictions against a brute-force ranking, the real
``mlflow models serve`` over loopback HTTP, and ``tpr search`` on the champion."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

mlflow = pytest.importorskip("mlflow")

import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from pipelines import registry, registry_cli  # noqa: E402
from tests.pipelines import registry_fixtures as fx  # noqa: E402

NAME = "serve"
URI = f"models:/{NAME}@champion"


@pytest.fixture(scope="module")
def champion():
    """The shared tracking server and a trained champion whose gallery is the val split."""
    with fx.tracking_uri() as uri:
        run_id = fx.log_training_run("trained")
        res = registry.promote(NAME, run_id=run_id, gallery_split=fx.SPLIT)
        assert res.promoted
        yield uri


@pytest.fixture(scope="module")
def pyfunc(champion):
    return mlflow.pyfunc.load_model(URI)


@pytest.fixture(scope="module")
def val_index(tmp_path_factory) -> str:
    """An index (``tpr_core.index``) of the val images as a plain folder, by the champion's weights."""
    from tpr_core.export import load_exported
    from tpr_core.index import build_index

    out = tmp_path_factory.mktemp("index") / "val"
    build_index(load_exported(fx.exported_model("trained")), "trained", fx.val_images()[0], out)
    return str(out)


def _val_people() -> list[int]:
    from tpr_core.data.store import load_split_table

    t = load_split_table(fx.dataset()["root"], fx.SPLIT, columns=["orig_id"])
    return sorted(set(t.column("orig_id").to_pylist()))


def test_predict_matches_bruteforce_ranking(pyfunc):
    """Top-k ids and scores equal a plain cosine ranking of the exported model's features."""
    from tpr_core.data.dataset import load_split
    from tpr_core.export import load_exported

    texts = ["a man in a red coat", fx.describe_identity(_val_people()[0])]
    out = pyfunc.predict(pd.DataFrame({"text": texts}), params={"top_k": 4})
    assert list(out.columns) == ["text", "image_ids", "image_paths", "orig_ids", "scores"]
    assert out["text"].tolist() == texts

    ex = load_exported(fx.exported_model("trained"))
    data = load_split(fx.dataset()["root"], fx.SPLIT)
    from tpr_core.data.transforms import ImageTransform

    tf = ImageTransform(tuple(ex.cfg.model.image_size), train=False)
    with torch.no_grad():
        imgs = torch.stack([tf(data.image_bytes(u)) for u in range(data.num_images)])
        g = ex.model.encode_image(imgs)
        ids, mask = ex.tokenizer.encode(texts, ex.cfg.model.text_length)
        q = ex.model.encode_text(ids, mask)
    g = g / g.norm(dim=1, keepdim=True)
    q = q / q.norm(dim=1, keepdim=True)
    sim = (q @ g.T).numpy()  # (2, G)
    for i in range(len(texts)):
        order = sorted(range(sim.shape[1]), key=lambda j: (-sim[i, j], j))[:4]
        assert out["image_ids"][i] == [int(data.unique_image_ids[j]) for j in order]
        np.testing.assert_allclose(out["scores"][i], sim[i, order], atol=1e-5)
        assert out["scores"][i] == sorted(out["scores"][i], reverse=True)


def test_top_k_param_default_and_cap(pyfunc):
    one = pyfunc.predict(pd.DataFrame({"text": ["a woman with a black backpack"]}))
    assert len(one["image_ids"][0]) == 10  # default top_k
    many = pyfunc.predict(pd.DataFrame({"text": ["x"]}), params={"top_k": 1000})
    assert len(many["image_ids"][0]) == 18  # capped at the gallery size
    with pytest.raises(Exception, match="text"):
        pyfunc.predict(pd.DataFrame({"query": ["x"]}))


def test_bad_queries_are_refused_and_long_ones_cut(pyfunc):
    for bad, needle in ((None, "is missing"), ("  ", "is empty")):
        with pytest.raises(Exception, match=needle):
            pyfunc.predict(pd.DataFrame({"text": ["a man", bad]}))
    text = "a woman with a black backpack "
    long = pyfunc.predict(pd.DataFrame({"text": [text * 200_000]}))  # 6 MB
    bound = pyfunc.unwrap_python_model().cfg.model.text_length * 64  # MAX_QUERY_CHARS_PER_TOKEN
    cut = pyfunc.predict(pd.DataFrame({"text": [(text * 200_000)[:bound]]}))
    assert long["image_ids"][0] == cut["image_ids"][0] and long["scores"][0] == cut["scores"][0]


def test_search_finds_the_described_person_above_chance(pyfunc):
    """Fresh descriptions of the val identities (not dataset captions) find them at rank 1 far
    more often than chance (2 of 18 images are the person's: 11 %)."""
    people = _val_people()
    texts = [fx.describe_identity(p) for p in people]
    out = pyfunc.predict(pd.DataFrame({"text": texts}), params={"top_k": 1})
    hits = sum(int(o[0] == p) for o, p in zip(out["orig_ids"], people, strict=True))
    chance = 2 / 18
    assert hits / len(people) >= 3 * chance, (hits, len(people))


def test_search_cli(champion, tmp_path):
    app = typer.Typer()
    registry_cli.register(app)
    person = _val_people()[1]
    text = fx.describe_identity(person)
    grid = tmp_path / "grid.png"
    res = CliRunner().invoke(
        app, ["search", text, "--model", URI, "--top-k", "3", "--out", str(grid), "--person", str(person)]
    )
    assert res.exit_code == 0, res.output
    direct = registry.search(text, URI, top_k=3)
    for row in direct.rows:
        assert str(row["image_id"]) in res.output and row["image_path"] in res.output
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_request_or_the_model_config_names_an_index_instead_of_the_gallery(champion, pyfunc, val_index, tmp_path):
    """``index_uri`` in the request params (or the model config) ranks that index: the same
    images by the same weights give the gallery's ranking and scores, without gallery ids; an
    index of other weights is refused naming both models (#21)."""
    from tpr_core.export import load_exported
    from tpr_core.index import build_index

    texts = pd.DataFrame({"text": [fx.describe_identity(p) for p in _val_people()[:3]]})
    gallery = pyfunc.predict(texts, params={"top_k": 4})
    indexed = pyfunc.predict(texts, params={"top_k": 4, "index_uri": val_index})
    assert indexed["image_paths"].tolist() == gallery["image_paths"].tolist()
    np.testing.assert_allclose(np.array(indexed["scores"].tolist()), np.array(gallery["scores"].tolist()), atol=1e-5)
    assert indexed["image_ids"].tolist() == [[-1] * 4] * 3 and indexed["orig_ids"].tolist() == [[-1] * 4] * 3
    configured = mlflow.pyfunc.load_model(URI, model_config={"index_uri": val_index})
    assert configured.predict(texts, params={"top_k": 4})["image_paths"].tolist() == gallery["image_paths"].tolist()
    other = tmp_path / "other"
    build_index(load_exported(fx.exported_model("untrained")), "untrained-model", fx.val_images()[0], other)
    with pytest.raises(Exception, match="made by model 'untrained-model'.*not by 'the served model'"):
        pyfunc.predict(texts, params={"index_uri": str(other)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlflow_models_serve_answers_over_http(champion, pyfunc, val_index, tmp_path):
    port = _free_port()
    log = open(tmp_path / "serve.log", "wb")
    # The scoring server runs `uvicorn` from PATH: the venv's bin must be on it, as when activated.
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", URI, "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"],  # fmt: skip
        stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True,
    )  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with opener.open(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        text = fx.describe_identity(_val_people()[2])
        body = json.dumps({"dataframe_records": [{"text": text}], "params": {"top_k": 5}}).encode()
        req = urllib.request.Request(
            f"{base}/invocations", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with opener.open(req, timeout=60) as r:
            answer = json.loads(r.read())
        (pred,) = answer["predictions"]
        local = pyfunc.predict(pd.DataFrame({"text": [text]}), params={"top_k": 5})
        assert pred["image_ids"] == local["image_ids"][0]
        assert pred["image_paths"] == local["image_paths"][0]
        np.testing.assert_allclose(pred["scores"], local["scores"][0], atol=1e-6)
        # A request can name an index to rank instead of the gallery (#21).
        body = json.dumps({"dataframe_records": [{"text": text}], "params": {"top_k": 5, "index_uri": val_index}})
        req = urllib.request.Request(
            f"{base}/invocations", data=body.encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        with opener.open(req, timeout=60) as r:
            (indexed,) = json.loads(r.read())["predictions"]
        assert indexed["image_paths"] == pred["image_paths"] and indexed["image_ids"] == [-1] * 5
        np.testing.assert_allclose(indexed["scores"], pred["scores"], atol=1e-5)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_search_loads_the_models_data_not_its_code(champion, pyfunc, monkeypatch):
    """tpr search ranks with the installed serving code: loading the model as a pyfunc (which
    imports the code stored with it) is never called, and the ranking is the pyfunc's."""
    text = fx.describe_identity(_val_people()[2])
    expected = pyfunc.predict(pd.DataFrame({"text": [text]}), params={"top_k": 5})

    def refuse(*args, **kwargs):
        raise AssertionError("tpr search imported the model's stored code")

    monkeypatch.setattr(mlflow.pyfunc, "load_model", refuse)
    res = registry.search(text, URI, top_k=5)
    assert [r["image_id"] for r in res.rows] == list(expected["image_ids"][0])
    assert [r["score"] for r in res.rows] == pytest.approx(list(expected["scores"][0]), abs=1e-6)


def _stored_files(name: str) -> list[Path]:
    """Every file the registered version behind ``URI`` keeps in the server's artifact store."""
    mv = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
    keys = {k for k in (mv.model_id, mv.source.rstrip("/").rsplit("/", 1)[-1]) if k}  # its logged model's id
    found = [p for p in (fx._CACHE / "runs").rglob(name) if keys & set(p.parts)]
    assert found, f"no stored {name} for version {mv.version} ({mv.source})"
    return found


def _tpr(*args: str) -> subprocess.CompletedProcess:
    """The installed ``tpr`` command in a fresh process (nothing imported beforehand)."""
    code = "import sys; from pipelines.cli import main; sys.argv[0] = 'tpr'; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}, cwd=fx.REPO)


def test_code_edited_in_the_artifact_store_never_runs(champion, tmp_path):
    """Someone who can write the artifact store edits the stored serving module and a stored
    ``tpr_core`` file to leave a marker: ``tpr search`` and ``tpr evaluate`` load the model's
    data with the installed code, so the marker never appears (#18)."""
    marker = tmp_path / "ran"
    payload = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran')\n"
    edited = _stored_files("serving_model.py") + [p for p in _stored_files("__init__.py") if p.parent.name == "tpr_core"]
    assert len(edited) == 2
    saved = {p: p.read_bytes() for p in edited}
    try:
        for p, body in saved.items():
            p.write_bytes(body + b"\n" + payload.encode())  # runs on import
        text = fx.describe_identity(_val_people()[0])
        search = _tpr("search", text, "--model", URI, "--top-k", "3")
        assert search.returncode == 0, search.stderr[-2000:]
        evaluate = _tpr("evaluate", "--model", URI, "--split", fx.SPLIT)
        assert evaluate.returncode == 0, evaluate.stderr[-2000:]
        assert "R1" in evaluate.stdout
        assert not marker.exists()
        # The control: loading it as a pyfunc (what `mlflow models serve` does) runs the edit.
        code = f"import mlflow; mlflow.pyfunc.load_model({URI!r})"
        ctl = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()})
        assert marker.exists(), ctl.stderr[-3000:]
    finally:
        for p, body in saved.items():
            p.write_bytes(body)


def test_one_changed_byte_in_the_stored_weights_is_refused(champion):
    """The weights' SHA-256 is recorded at registration; a stored file changed afterwards, by a
    single byte, is refused by name when tpr loads the model (#18)."""
    (weights,) = _stored_files("model.safetensors")
    body = weights.read_bytes()
    flipped = bytearray(body)
    flipped[-1] ^= 0x01  # the last byte of the last tensor
    try:
        weights.write_bytes(bytes(flipped))
        res = _tpr("search", "a person", "--model", URI)
        assert res.returncode == 2, (res.stdout, res.stderr[-2000:])
        said = " ".join((res.stdout + res.stderr).split())  # rich wraps long lines
        assert "model.safetensors" in said and "the artifact was changed after registration" in said
    finally:
        weights.write_bytes(body)


@pytest.mark.parametrize("bad", [5, 2.5, b"a man", ["a", "man"], True])
def test_a_non_string_is_refused_through_mlflows_own_input_path(pyfunc, bad):
    """Through the pyfunc's whole input path: MLflow 3.17's schema enforcement lets a mixed
    object column through to the model (its string check is on the column's dtype), so the
    model's own check is what refuses the row, naming it and the type it got."""
    with pytest.raises(Exception, match=rf"row 1: field 'text' must be a string, got {type(bad).__name__}"):
        pyfunc.predict(pd.DataFrame({"text": ["a man", bad]}))


def test_read_only_commands_read_the_store_without_a_server(champion):
    """With no MLFLOW_TRACKING_URI, ``search``, ``models`` and ``promote --dry-run`` read the SQLite
    store and its artifact folder under --runs-dir directly (#19): the ranking the server gives,
    the champion listed, and a dry-run gate that registers nothing."""
    from pipelines.env import scoped_env

    app = typer.Typer()
    registry_cli.register(app)
    runs = str(fx._CACHE / "runs")  # the shared server's store, read here beside it
    text = fx.describe_identity(_val_people()[2])
    served = registry.search(text, URI, top_k=3).rows
    untrained = fx.log_training_run("untrained")
    client = mlflow.MlflowClient()
    before = [(v.version, v.aliases) for v in client.search_model_versions(f"name='{NAME}'")]
    db = fx._CACHE / "runs" / "mlflow" / "mlflow.db"
    with scoped_env(MLFLOW_TRACKING_URI=None):
        search = CliRunner().invoke(app, ["search", text, "--model", URI, "--top-k", "3", "--runs-dir", runs])
        models = CliRunner().invoke(app, ["models", "--model-name", NAME, "--runs-dir", runs])
        dry = CliRunner().invoke(
            app, ["promote", "--dry-run", "--model-name", NAME, "--run", untrained, "--runs-dir", runs]
        )
        assert os.environ.get("MLFLOW_TRACKING_URI") is None
    assert search.exit_code == 0, search.output
    for row in served:
        assert row["image_path"] in search.output and f"{row['score']:.4f}" in search.output
    assert models.exit_code == 0 and "champion" in models.output and "promoted" in models.output, models.output
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert f"{float(champion.tags['tpr.gate.R1']):.2f} (val)" in models.output, models.output  # the gate's R@1
    assert dry.exit_code == registry.EXIT_KEPT, dry.output
    assert "would be kept" in dry.output and "nothing was registered" in " ".join(dry.output.split())
    logged = client.search_logged_models([client.get_run(untrained).info.experiment_id],
                                         filter_string=f"source_run_id = '{untrained}'")  # the run's model
    assert f"models:/{logged[0].model_id}" in "".join(dry.output.split()), dry.output
    assert [(v.version, v.aliases) for v in client.search_model_versions(f"name='{NAME}'")] == before
    assert db.is_file()
