import json
import shutil
import subprocess

import pytest

from infmoe.cli import main, parse_overrides


def test_params_table_lists_requested_configs(capsys):
    """The table against facts from outside this code: GPT-2 small has 124,439,808
    parameters, and the paper's GPT-2-small ∞-MoE 186M total and 129M active (within 2%)."""
    assert main(["params", "gpt2-small-infmoe", "gpt2-small-dense"]) == 0
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in capsys.readouterr().out.splitlines()]
    rows = {row[0]: row for row in cells if row and row[0].startswith("gpt2-small")}
    millions = {name: [float(cell.strip("≤M")) for cell in row[2:4]] for name, row in rows.items()}  # total, K=1
    assert millions["gpt2-small-dense"] == [pytest.approx(124.44, abs=0.005)] * 2
    total, active = millions["gpt2-small-infmoe"]
    assert abs(total / 186 - 1) <= 0.02 and abs(active / 129 - 1) <= 0.02
    assert rows["gpt2-small-infmoe"][4].startswith("≤")  # K = 2: an upper bound on the union of masks


def test_params_json_and_overrides(capsys):
    assert main(["params", "tiny-infmoe", "--json", "--n_layer", "2", "--samples", "1,8"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["name"] == "tiny-infmoe" and set(row["active"]) == {"1", "8"}
    assert main(["params", "tiny-infmoe", "--json"]) == 0
    (full,) = json.loads(capsys.readouterr().out)
    assert row["total"] < full["total"]  # --n_layer 2 took effect


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["params", "gpt3"], "unknown config 'gpt3'"),
        (["params", "--bogus", "3", "tiny-dense"], "unknown config key 'bogus'"),
        (["params", "tiny-infmoe", "--units_per_block", "7"], "units_per_block=7"),
        (["params", "tiny-infmoe", "--active_fraction", "1.5"], "active_fraction=1.5"),
        (["params", "tiny-dense", "--samples", "0"], "K must be >= 1"),
        (["params", "tiny-dense", "--n_layer"], "--n_layer has no value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_old_option_name_works_and_warns_once_in_one_line(capsys, monkeypatch):
    from infmoe.training import resolve

    monkeypatch.setattr("infmoe.deprecation._warned", set())
    assert main(["params", "tiny-infmoe", "--json", "--block_size", "16"]) == 0
    old = capsys.readouterr()
    assert old.err == ("infmoe params: warning: the ffn='infmoe' option block_size is now units_per_block; "
                       "the old name still works for now\n")
    assert main(["params", "tiny-infmoe", "--json", "--block_size", "16"]) == 0
    assert capsys.readouterr().err == ""  # once per process
    assert main(["params", "tiny-infmoe", "--json", "--units_per_block", "16"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(old.out)
    _, model = resolve({"config": "tiny-infmoe", "block_size": 16})  # infmoe train, experiment specs
    assert model.ffn_options["units_per_block"] == 16


def test_argparse_mistakes_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.count("\n") == 1


def test_override_values_are_typed():
    assert parse_overrides(["--d_z", "32", "--capacity-factor=null", "--gate", "softmax", "--kl_weight", "1e-3"]) == {
        "d_z": 32, "capacity_factor": None, "gate": "softmax", "kl_weight": 1e-3}
    assert parse_overrides(["--name", "nan", "--other", "inf"]) == {"name": "nan", "other": "inf"}  # words, not floats


def test_text_settings_stay_as_written(tmp_path, monkeypatch, capsys):
    from infmoe.cli import TEXT_SETTINGS
    from infmoe.training import resolve

    assert {"out_dir", "data", "init_from", "cache_dir", "config"} <= TEXT_SETTINGS
    assert parse_overrides(["--out_dir", "nan", "--data", "1e3"], text=TEXT_SETTINGS) == {"out_dir": "nan", "data": "1e3"}
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--out_dir", "2024", "--data", "missing.txt"]) == 2  # a folder named 2024, a missing file
    assert "missing.txt" in capsys.readouterr().err
    with pytest.raises(Exception, match="out_dir=2024 is invalid: must be text"):
        resolve({"out_dir": 2024})  # as an experiment spec's unquoted YAML would give it


def test_console_script_is_installed():
    script = shutil.which("infmoe")
    assert script, "the `infmoe` console script is missing: pip install -e ."
    done = subprocess.run([script, "params", "tiny-dense"], capture_output=True, text=True)
    assert done.returncode == 0 and "tiny-dense" in done.stdout
