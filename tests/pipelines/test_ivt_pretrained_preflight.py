"""tpr train's steps before Ray, for an ivt run from a timm ViT and a BERT folder (tiny fakes).

The fake checkpoints have the tiny shared preset's sizes (width 128, 2 blocks, 4 heads; see
tests/tpr_core/test_ivt_pretrained.py); nothing is downloaded and no Ray instance starts.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.pipelines.conftest import REPO, tiny_overrides
from tests.tpr_core.test_ivt_pretrained import BERT_VOCAB, fake_bert, fake_vit
from tpr_core.config import ConfigError
from tpr_core.experiment import load_config

CONFIG = REPO / "pipelines/configs/ivt_synthetic_tiny.yaml"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("ivt-ckpts")
    vit, _ = fake_vit(tmp, "vit")  # 32 x 32 at patch 8: positions resized to the config's 12 x 4 grid
    bert, _ = fake_bert(tmp, "bert", max_position_embeddings=64)  # the config's text_length is 48
    return {"tmp": tmp, "vit": vit, "bert": bert}


def _cfg(synth_data, **extra):
    return load_config(CONFIG, tiny_overrides(synth_data, **extra))


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to start Ray."""
    import pipelines.train

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(pipelines.train, "init_ray", refuse)
    monkeypatch.setattr("pipelines.setup.init_ray", refuse)
    yield
    import ray

    assert not ray.is_initialized()


def test_prepare_run_writes_the_bert_tokenizer(synth_data, ckpts, tmp_path, monkeypatch, no_ray):
    from pipelines.train import prepare_run
    from tpr_core.data.dataset import load_split, train_identity_count
    from tpr_core.data.tokenizer import Tokenizer
    from tpr_core.models import build_method
    from tpr_core.models.ivt_pretrained import check_bert_tokenizer

    # Relative paths, as on a command line: resolved before the workers (elsewhere) read them.
    monkeypatch.chdir(ckpts["tmp"])
    cfg = _cfg(synth_data, model__pretrained="vit/model.safetensors", model__pretrained_text="bert")
    _, job = prepare_run(cfg, tmp_path / "runs", "ivt-bert")
    cfg = job.cfg
    assert cfg.model.pretrained == str(ckpts["vit"] / "model.safetensors")
    assert cfg.model.pretrained_text == str(ckpts["bert"])
    assert job.cfg.model.pretrained_text == str(ckpts["bert"])

    tok_dir = Path(job.tokenizer_dir)
    meta = json.loads((tok_dir / "tpr_tokenizer.json").read_text())
    assert meta["kind"] == "bert" and meta["max_length"] == 48
    assert meta["tokens"] == {"bos": "[CLS]", "eos": "[SEP]", "pad": "[PAD]", "mask": "[MASK]"}
    tok = Tokenizer.load(tok_dir)
    assert tok.vocab_size == BERT_VOCAB  # BERT's vocabulary, no token appended
    check_bert_tokenizer(tok, cfg.model.pretrained_text)
    # What a worker does with it: the model builds from both checkpoints and this tokenizer.
    torch.manual_seed(0)
    model = build_method(cfg, train_identity_count(load_split(cfg.data.root, "train")), tok)
    assert model.encoder.token_embed.num_embeddings == BERT_VOCAB
    assert not (tmp_path / "runs" / "ray").exists()

    # A ViT without a BERT: the preflight takes the ViT file, the tokenizer is trained on the captions.
    _, job = prepare_run(
        _cfg(synth_data, model__pretrained=str(ckpts["vit"])), tmp_path / "runs", "ivt-vit"
    )
    assert json.loads((Path(job.tokenizer_dir) / "tpr_tokenizer.json").read_text())["kind"] == "bpe"


def test_missing_checkpoint_files_fail_before_ray(synth_data, ckpts, tmp_path, no_ray):
    from pipelines.train import train

    runs = tmp_path / "runs"
    bert = tmp_path / "bert"
    shutil.copytree(ckpts["bert"], bert)
    (bert / "vocab.txt").unlink()
    with pytest.raises(
        ConfigError, match=rf"model.pretrained_text {bert}: no tokenizer vocabulary {bert}/vocab.txt"
    ):
        train(_cfg(synth_data, model__pretrained_text=str(bert)), runs_dir=runs, name="x")
    (bert / "vocab.txt").write_text((ckpts["bert"] / "vocab.txt").read_text())
    (bert / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=rf"no BERT weights file \({bert}/model.safetensors or"):
        train(_cfg(synth_data, model__pretrained_text=str(bert)), runs_dir=runs, name="x")
    missing = tmp_path / "vit.safetensors"
    with pytest.raises(ConfigError, match=rf"model.pretrained {missing}: file not found"):
        train(
            _cfg(synth_data, model__pretrained=str(missing), model__pretrained_text=str(ckpts["bert"])),
            runs_dir=runs,
            name="x",
        )
    # A cased BERT: the tokenizer (tpr lower-cases captions) refuses it, naming the file.
    cased = tmp_path / "cased"
    shutil.copytree(ckpts["bert"], cased)
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(ConfigError, match=rf"{cased}/tokenizer_config.json: do_lower_case is false"):
        train(_cfg(synth_data, model__pretrained_text=str(cased)), runs_dir=runs, name="x")
    assert not (runs / "ray").exists() and not (runs / "tokenizers" / "x").exists()
