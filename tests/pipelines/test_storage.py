"""Run storage helpers over pyarrow.fs: local paths and URIs (file:// here; s3:// alike).

Telling a URI from a path is tpr_core.data.store.is_uri (tests/tpr_core/test_store.py)."""

from pipelines import storage


def test_text_and_bytes_round_trip_through_a_uri(tmp_path):
    uri = f"file://{tmp_path}/a/b/result.json"
    assert not storage.exists(uri)
    storage.write_text(uri, '{"R1": 12.5}')
    assert (tmp_path / "a" / "b" / "result.json").read_text() == '{"R1": 12.5}'
    assert storage.exists(uri) and storage.read_text(uri) == '{"R1": 12.5}'
    storage.write_bytes(str(tmp_path / "local.bin"), b"\x00\x01")
    assert storage.read_text(str(tmp_path / "local.bin")) == "\x00\x01"


def test_upload_replaces_and_local_dir_copies_once(tmp_path):
    src = tmp_path / "src"
    (src / "tokenizer").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"abc")
    (src / "tokenizer" / "vocab.json").write_text("{}")
    dest = f"file://{tmp_path}/store/run/model"
    (tmp_path / "store" / "run" / "model").mkdir(parents=True)
    (tmp_path / "store" / "run" / "model" / "stale.txt").write_text("old")
    storage.upload_dir(src, dest)
    got = sorted(p.relative_to(tmp_path / "store/run/model").as_posix()
                 for p in (tmp_path / "store/run/model").rglob("*") if p.is_file())
    assert got == ["tokenizer/vocab.json", "weights.bin"]  # the stale file is gone

    cache = tmp_path / "cache"
    local = storage.local_dir(dest, cache_root=cache)
    assert open(f"{local}/weights.bin", "rb").read() == b"abc"
    assert open(f"{local}/tokenizer/vocab.json").read() == "{}"
    assert storage.local_dir(dest, cache_root=cache) == local  # made once
    assert len(list(cache.iterdir())) == 1
    assert storage.local_dir(str(src)) == str(src)  # a local path is used as it is


def test_local_dir_of_a_missing_folder_names_it(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="nothing-here"):
        storage.local_dir(f"file://{tmp_path}/nothing-here", cache_root=tmp_path / "c")
    assert not any((tmp_path / "c").iterdir())
