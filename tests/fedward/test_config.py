import pytest

from fedward.config import config_diff, config_hash, config_identity, config_to_dict, load_config, parse_config
from fedward.errors import ConfigError


def raw_config(**overrides):
    raw = {
        "run": {"name": "t", "rounds": 2},
        "data": {
            "kind": "table",
            "table": {
                "file": "ehr.csv",
                "features": {"age": "numeric", "sex": "categorical"},
                "label": {"column": "outcome", "positive_values": ["died"], "negative_values": "all others"},
            },
        },
        "model": {"kind": "mlp", "dropout": 0.2},
        "hospitals": [{"name": "a", "data": "d/a"}, {"name": "b", "data": "d/b", "model": {"dropout": 0.1}}],
    }
    for section, value in overrides.items():
        raw[section] = value
    return raw


def test_parses_nested_sections_and_per_hospital_model_options():
    config = parse_config(raw_config())
    assert config.data.table.features[1].name == "sex"
    assert config.data.table.label.positive_values == ("died",)
    assert config.model_for("a").dropout == 0.2
    assert config.model_for("b").dropout == 0.1
    assert config.run_dir.name == "t"


@pytest.mark.parametrize(
    "section, value, fragment",
    [
        ("run", {"name": "t", "rounds": "3"}, "run.rounds: expected a whole number"),
        ("run", {"name": "t", "colour": 1}, "unknown field(s) ['colour']"),
        ("model", {"kind": "transformer"}, "model.kind: expected one of ['mlp', 'cnn']"),
        ("model", {"kind": "mlp", "norm": "group", "hidden": [6], "groups": 4}, "must divide every width"),
        ("hospitals", [{"name": "a", "data": "x"}, {"name": "a", "data": "y"}], "duplicate names"),
        ("hospitals", [{"name": "a b", "data": "x"}, {"name": "b", "data": "y"}], "must be letters"),
        ("hospitals", [{"name": "a", "data": "x", "model": {"hidden": [3]}}, {"name": "b", "data": "y"}], "hospitals.a.model: ['hidden'] cannot differ"),
        ("hospitals", [{"name": "CPU", "data": "x"}, {"name": "b", "data": "y"}], "one of Ray's own resources"),
        ("run", {"name": ".."}, "run.name: expected a folder name"),
        ("run", {"name": "t", "seed": -1}, "run.seed: expected a whole number >= 0"),
        ("model", {"kind": "mlp", "norm": "group", "groups": 0}, "model.groups: expected at least 1"),
        ("model", {"kind": "cnn"}, "model.kind: 'cnn' cannot read data.kind 'table'"),
        ("privacy", {"masking": {"enabled": True}, "encryption": {"enabled": True}}, "enable one of them"),
        ("privacy", {"masking": {"enabled": True, "dropout_tolerance": 1}}, "threshold would be 1"),
        ("privacy", {"masking": {"clip": 4096.0}}, "overflows a 32-bit ring"),
        ("privacy", {"encryption": {"coeff_mod_bit_sizes": [60, 60, 60, 60]}}, "above the 218 that degree 8192 allows"),
        ("privacy", {"encryption": {"poly_modulus_degree": 1000}}, "privacy.encryption.poly_modulus_degree: expected one of"),
        ("privacy", {"dp_sgd": {"enabled": True}}, "privacy.dp_sgd: give epsilon"),
        ("privacy", {"dp_fedavg": {"enabled": True, "epsilon": 1, "delta": 2}}, "privacy.dp_fedavg.delta: expected a number in (0, 1)"),
        ("privacy", {"dp_sgd": {"enabled": True, "epsilon": 1, "unit": "visit"}}, "privacy.dp_sgd.unit: expected one of"),
        ("run", {"name": "t", "rounds": -2}, "run.rounds"),
        ("run", {"name": "t", "stale_weight": 1.5}, "run.stale_weight: expected a number in [0, 1]"),
        ("run", {"name": "t", "quorum_wait_s": -1}, "run.quorum_wait_s: must be >= 0"),
        ("robust", {"rule": "geometric_median"}, "robust.rule: expected one of"),
        ("robust", {"trim": 0.5}, "robust.trim: expected a share in (0, 0.5)"),
        ("robust", {"norm_bound": 0}, "robust.norm_bound: must be positive"),
        ("attack", {"hospitals": ["a"], "kind": "ddos"}, "attack.kind: expected one of"),
        ("subgroups", {"sex": "sex", "min_count": "ten"}, "subgroups.min_count: expected a whole number"),
    ],
)
def test_bad_values_name_the_field(section, value, fragment):
    with pytest.raises(ConfigError) as err:
        parse_config(raw_config(**{section: value}))
    assert fragment in str(err.value)


def test_mutually_exclusive_label_rules_fail_early():
    raw = raw_config()
    raw["data"]["table"]["label"] = {"column": "y", "positive_values": ["1"], "threshold": 0.5}
    with pytest.raises(ConfigError, match="either positive_values or threshold"):
        parse_config(raw)


def test_quorum_larger_than_federation_is_refused():
    with pytest.raises(ConfigError, match="min_hospitals=3 but only 2"):
        parse_config(raw_config(run={"name": "t", "min_hospitals": 3}))


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_numbers_written_as_yaml_text_and_numeric_label_values_are_read():
    raw = raw_config(train={"lr": "1e-3"})
    raw["data"]["table"]["label"] = {"column": "y", "positive_values": [2, 3], "negative_values": [0, 1]}
    config = parse_config(raw)
    assert config.train.lr == 0.001 and config.data.table.label.positive_values == ("2", "3")


def test_where_a_run_lives_and_how_long_it_waits_do_not_change_its_identity():
    a = parse_config(raw_config())
    moved = raw_config(run={"name": "t", "rounds": 2, "root": "/elsewhere", "round_timeout_s": 5})
    moved["hospitals"][0]["data"] = "/mnt/a"
    assert config_hash(a) == config_hash(parse_config(moved))


def test_hash_and_diff_follow_changes():
    a = parse_config(raw_config())
    b = parse_config(raw_config(run={"name": "t", "rounds": 3}))
    assert config_hash(a) == config_hash(parse_config(raw_config()))
    assert config_hash(a) != config_hash(b)
    assert config_diff(config_identity(a), config_identity(b)) == ["run.rounds: 2 -> 3"]


def test_diff_names_list_items():
    a = parse_config(raw_config())
    raw = raw_config()
    raw["data"]["table"]["features"] = {"sex": "categorical", "age": "numeric"}
    diff = config_diff(config_to_dict(a), config_to_dict(parse_config(raw)))
    assert "data.table.features[0].name: 'age' -> 'sex'" in diff


def test_hospital_paths_resolve_against_the_drivers_folder(tmp_path):
    config = parse_config(raw_config()).with_paths_from(tmp_path)
    assert config.hospital("a").data == str(tmp_path / "d" / "a")
    assert config.hospital("a").work_dir is None
    assert parse_config(raw_config()).with_paths_from(tmp_path / "x").hospital("b").data == str(tmp_path / "x" / "d" / "b")


def test_settings_from_the_command_line_override_the_file(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config()))
    config = load_config(path, ["privacy.masking.enabled=true", "privacy.masking.dropout_tolerance=0", "train.lr=1e-3", "run.name=other"])
    assert config.privacy.masking.enabled and config.train.lr == 0.001 and config.run.name == "other"
    with pytest.raises(ConfigError, match="expected section.field=value"):
        load_config(path, ["privacy.masking.enabled"])
    with pytest.raises(ConfigError, match=r"with privacy.masking.colour=1: privacy.masking: unknown field\(s\) \['colour'\]"):
        load_config(path, ["privacy.masking.colour=1"])
    assert load_config(path, ["hospitals.b.model.width=0.5"]).model_for("b").hidden == tuple(
        -(-w // 2) for w in load_config(path).model.hidden
    )  # a hospital's own settings, picked by its name
    with pytest.raises(ConfigError, match=r"hospitals has no entry named 'z'"):
        load_config(path, ["hospitals.z.cpus=1"])


def test_a_dropout_layer_at_only_some_hospitals_is_refused():
    with pytest.raises(ConfigError, match="hospitals.b.model.dropout: a dropout layer only where model.dropout is 0"):
        parse_config(raw_config(model={"kind": "mlp"}))


def test_a_config_written_before_tasks_keeps_its_identity_so_its_runs_resume():
    # The hash commit 0d6210f gave this config, whose positive_values then meant "all others negative".
    assert config_hash(parse_config(raw_config())) == "49c518b666e3b3b05891ee1eaf97a1ff573ba4c6ec5259dc2010e34ec605bb4b"
    listed = raw_config()
    listed["data"]["table"]["label"]["negative_values"] = ["home"]
    assert config_hash(parse_config(listed)) != config_hash(parse_config(raw_config()))


def test_positive_values_need_the_negative_ones_said():
    raw = raw_config()
    raw["data"]["table"]["label"].pop("negative_values")
    with pytest.raises(ConfigError, match=r"label.negative_values \(outcome\): say which values are negative, as a list or as 'all others'"):
        parse_config(raw)
    raw["data"]["table"]["label"]["negative_values"] = ["died", "home"]
    with pytest.raises(ConfigError, match=r"\['died'\] are listed as both positive and negative"):
        parse_config(raw)


@pytest.mark.parametrize(
    "task, label, fragment",
    [
        ({"kind": "multiclass"}, {"column": "grade"}, "task.classes: list the multiclass label values"),
        ({"kind": "multiclass", "classes": ["a"]}, {"column": "grade"}, "needs at least two classes"),
        ({"kind": "regression", "classes": ["a", "b"]}, {"column": "los"}, "only a multiclass task has classes"),
        ({"kind": "regression"}, {"column": "los", "threshold": 3}, "positive_values and threshold make a binary outcome, but task.kind is regression"),
        ({"kind": "ordinal"}, {"column": "grade"}, "task.kind: expected one of ['binary', 'multiclass', 'regression']"),
        ({"target": "no_colon"}, {"column": "grade"}, "task.target: expected 'package.module:name'"),
    ],
)
def test_task_settings_are_checked_at_load(task, label, fragment):
    raw = raw_config(task=task, explain={"enabled": False})
    raw["data"]["table"]["label"] = label
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("(", r"\(")):
        parse_config(raw)


def test_a_model_is_a_built_in_kind_or_a_target_never_both_and_errors_name_features_by_name():
    with pytest.raises(ConfigError, match="model: give either kind"):
        parse_config(raw_config(model={"kind": "mlp", "target": "study.nets:make"}))
    with pytest.raises(ConfigError, match="model.args: arguments for model.target"):
        parse_config(raw_config(model={"kind": "mlp", "args": {"depth": 3}}))
    with pytest.raises(ConfigError, match=r"hospitals.b.model: \['dropout'\] are options of the built-in networks; model.target study.nets:make"):
        parse_config(raw_config(model={"target": "study.nets:make"}))
    config = parse_config(raw_config(model={"target": "study.nets:make", "args": {"depth": 3}}, hospitals=[{"name": "a"}, {"name": "b"}]))
    assert config.model.name == "model.target study.nets:make" and config.model.args == {"depth": 3}
    raw = raw_config()
    raw["data"]["table"]["features"] = [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "nominal"}]
    with pytest.raises(ConfigError, match=r"data.table.features.sex.type: expected one of"):
        parse_config(raw)
    with pytest.raises(ConfigError, match=r"hospitals.b.cpus: expected a number"):
        parse_config(raw_config(hospitals=[{"name": "a", "data": "x"}, {"name": "b", "data": "y", "cpus": "two"}]))


def test_missing_value_codes_are_given_per_feature():
    raw = raw_config()
    raw["data"]["table"]["features"] = {"age": {"type": "numeric", "missing_values": [-9, 0]}, "sex": "categorical"}
    config = parse_config(raw)
    assert config.data.table.features[0].missing_values == ("-9", "0") and config.data.table.features[1].missing_values == ()
    assert "missing_values" in config_identity(config)["data"]["table"]["features"][0]


def test_settings_added_later_at_their_defaults_leave_the_identity_of_any_config():
    raw = raw_config(strategy={"name": "scaffold"}, train={"momentum": 0.0, "lr": 0.2})
    identity = config_identity(parse_config(raw))
    assert "lr_schedule" not in identity["train"] and "validation_fraction" not in identity["train"] and identity["train"]["lr"] == 0.2
    raw["train"].update(lr_schedule="cosine", validation_fraction=0.2)
    changed = config_identity(parse_config(raw))["train"]
    assert changed["lr_schedule"] == "cosine" and changed["validation_fraction"] == 0.2 and "patience" not in changed


def test_patient_level_dp_without_a_patient_id_column_is_refused_naming_both_fields():
    private = {"dp_sgd": {"enabled": True, "epsilon": 1}}
    with pytest.raises(ConfigError, match=r"privacy.dp_sgd.unit: patient .* data.table.patient_id is not set"):
        parse_config(raw_config(privacy=private))
    assert parse_config(raw_config(privacy={"dp_sgd": {**private["dp_sgd"], "unit": "sample"}})).privacy.dp_sgd.unit == "sample"
    raw = raw_config(privacy=private)
    raw["data"]["table"]["patient_id"] = "patient"
    assert parse_config(raw).data.table.patient_id == "patient"
