import pytest
import yaml

from tpr_core.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    dump_config,
    field_bounds,
    flatten,
    parse_config,
)
from tpr_core.experiment import check_experiment, config_from_dict, load_config


def _write(tmp_path, tree, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(tree))
    return p


def test_defaults_resolve_method_weights():
    cfg = check_experiment(ExperimentConfig(method="fmfa", data={"batch_size": 8}))
    assert cfg.loss.weights == {"a_sdm": 1.0, "efa": 1.0, "mlm": 1.0, "id": 1.0}
    cfg = config_from_dict({"method": "irra", "loss": {"weights": {"id": 0.5}}, "data": {"batch_size": 8}})
    assert cfg.loss.weights == {"sdm": 1.0, "id": 0.5, "mlm": 1.0}


def test_dotted_overrides_parse_types(tmp_path):
    p = _write(tmp_path, {"method": "irra", "data": {"batch_size": 8}})
    cfg = load_config(p, ["optim.lr=1e-5", "loss.weights.id=0.25", "distributed.zero_stage=3", "model.pretrained=null"])
    assert cfg.optim.lr == pytest.approx(1e-5) and isinstance(cfg.optim.lr, float)
    assert cfg.loss.weights["id"] == 0.25
    assert cfg.distributed.zero_stage == 3
    assert cfg.model.pretrained is None


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["distributed.zero_stage=4"], "distributed.zero_stage"),
        (["distributed.zero_stage=two"], "distributed.zero_stage"),
        (["loss.mlm_mask_ratio=1.5"], "loss.mlm_mask_ratio"),
        (["loss.weights.efa=1"], "loss.weights.efa"),  # irra has no efa term
        (["loss.weights.id=-1"], "loss.weights.id"),
        (["method=clip4ever"], "clip4ever"),
        (["optim.lr"], "key=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, overrides, needle):
    p = _write(tmp_path, {"method": "irra", "data": {"batch_size": 8}})
    with pytest.raises(ConfigError) as e:
        load_config(p, overrides)
    assert needle in str(e.value)


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    p = _write(tmp_path, {"method": "irra", "optim": {"lr": 1e-4, "momentm": 0.9}, "data": {"batch_size": 8}})
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "optim.momentm" in str(e.value) and "unknown key" in str(e.value) and str(p) in str(e.value)


def test_cross_field_batch_divisibility_names_both_fields():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"data": {"batch_size": 10}, "distributed": {"num_workers": 4}})
    msg = str(e.value)
    assert "data.batch_size" in msg and "distributed.num_workers" in msg


def test_dump_and_reload_is_identity(tmp_path):
    cfg = config_from_dict({"method": "uit", "model": {"image_size": [96, 32], "patch_size": 8}, "data": {"batch_size": 8}})
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    again = load_config(p)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_flatten_and_bounds():
    cfg = check_experiment(ExperimentConfig(data={"batch_size": 8}))
    flat = flatten(cfg.model_dump(mode="json"))
    assert flat["loss.weights.sdm"] == 1.0 and flat["optim.lr"] == 1e-5
    assert field_bounds("loss.mlm_mask_ratio") == (0.0, 1.0, False, False)
    assert field_bounds("distributed.zero_stage") == (0, 3, True, True)
    with pytest.raises(ConfigError):
        field_bounds("loss.nope")


def test_override_into_non_section_is_error():
    with pytest.raises(ConfigError):
        apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr.x=1"])


def test_the_schema_alone_leaves_the_method_checks_to_experiment():
    # tpr_core.config knows no method table: a method name or term it cannot judge passes the
    # schema, and the checking entry points reject it with the same message.
    tree = {"method": "clip4ever", "data": {"batch_size": 8}}
    assert parse_config(tree).loss.weights == {}
    with pytest.raises(ConfigError, match=r"unknown method 'clip4ever'; known methods: \['fmfa', 'irra', 'ivt', 'uit'\]"):
        check_experiment(parse_config(tree))
    with pytest.raises(ConfigError, match=r"invalid config here\.yaml:\n  unknown method 'clip4ever'"):
        config_from_dict(tree, "here.yaml")


def test_weights_for_another_method_name_its_terms():
    with pytest.raises(ConfigError, match=r"loss.weights.mla is not a loss term of method 'fmfa'; its terms are "
                       r"\['a_sdm', 'efa', 'id', 'mlm'\]"):
        config_from_dict({"method": "fmfa", "loss": {"weights": {"mla": 1.0}}, "data": {"batch_size": 8}})


def test_an_unset_sampler_is_the_recipes_and_a_set_one_is_kept(tmp_path):
    # UIT's recipe trains with SEN's idrannum sampler; irra, fmfa and ivt shuffle.
    base = {"data": {"batch_size": 8}}
    assert config_from_dict({"method": "uit", **base}).data.sampler == "identity_random_k"
    for method in ("irra", "fmfa", "ivt"):
        assert config_from_dict({"method": method, **base}).data.sampler == "random"
    explicit = config_from_dict({"method": "uit", "data": {"batch_size": 8, "sampler": "random"}})
    assert explicit.data.sampler == "random"
    # Filled once, the value is explicit: a dump and reload (a sweep trial) keeps it.
    p = tmp_path / "uit.yaml"
    p.write_text(dump_config(config_from_dict({"method": "uit", **base})))
    assert load_config(p).data.sampler == "identity_random_k"


@pytest.mark.parametrize(
    "section, value, needle",
    [
        ({"loss": {"weights": {"id": float("nan")}}}, None, r"loss.weights.id: Input should be a finite number"),
        ({"loss": {"weights": {"sdm": float("inf")}}}, None, r"loss.weights.sdm: Input should be a finite number"),
        ({"optim": {"betas": [0.9, 1.0]}}, None, r"optim.betas: .*each must be in \[0, 1\)"),
        ({"optim": {"betas": [-0.1, 0.9]}}, None, r"optim.betas: .*each must be in \[0, 1\)"),
        ({"optim": {"warmup_epochs": float("inf")}}, None, r"optim.warmup_epochs: Input should be a finite number"),
        ({"optim": {"eps": float("inf")}}, None, r"optim.eps: Input should be a finite number"),
        ({"optim": {"grad_clip": float("inf")}}, None, r"optim.grad_clip: Input should be a finite number"),
        ({"train": {"epochs": True}}, None, r"train.epochs: .*True: a boolean where int is expected"),
        ({"optim": {"lr": False}}, None, r"optim.lr: .*False: a boolean where float is expected"),
        ({"model": {"image_size": [True, 128]}}, None, r"model.image_size: .*a boolean where"),
        ({"model": {"image_size": [65536, 128]}}, None, r"model.image_size: .*over 2048 pixels"),
    ],
)
def test_values_no_run_could_use_are_refused_naming_the_key(section, value, needle):
    tree = {"method": "irra", "data": {"batch_size": 8}, **section}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(tree, "c.yaml")


def test_booleans_stay_booleans_where_the_field_is_one():
    cfg = config_from_dict({"method": "irra", "data": {"batch_size": 8, "augment": False}})
    assert cfg.data.augment is False


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: irra\ndata:\n  batch_size: 8\ntrain:\n  epochs: 3\n  epochs: 5\n")
    with pytest.raises(ConfigError, match=r"(?s)config .*c.yaml is not valid YAML: key 'epochs' is given twice.*line 6"):
        load_config(p)
    with pytest.raises(ConfigError, match="key 'a' is given twice"):
        load_config(_write(tmp_path, {"method": "irra", "data": {"batch_size": 8}}), ["loss.weights={a: 1, a: 2}"])
