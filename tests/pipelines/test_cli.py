from fedward.pipelines.cli import main


def test_a_bad_config_exits_2_with_the_field_named(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("run: {name: x, rounds: zero}\n")
    assert main(["simulate", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "missing field(s)" in err


def test_status_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 2
    assert "not a fedward run directory" in capsys.readouterr().err


def test_demo_data_writes_hospitals_and_reports_the_ceiling(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "d"), "--hospitals", "2", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "best achievable AUROC" in out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["hospital_a", "hospital_b", "truth.json"]
