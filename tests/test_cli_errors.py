"""`jaxsr` argument and input errors: one clear line on stderr, a non-zero exit, no traceback.

Only `jaxsr.cli.main(argv)`, its exit code and the printed text are tested, so the tests hold however the CLI's
modules are arranged.
"""

import pytest

from jaxsr.cli import main
from jaxsr.config import CONFIG_DIR

TINY = str(CONFIG_DIR / "tiny.yaml")


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr): argparse exits by SystemExit, handled errors by main's return value."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return int(code or 0), out, err


def test_unknown_subcommand_lists_the_valid_ones(capsys):
    code, _, err = run_cli(["frobnicate"], capsys)
    assert code == 2
    assert "invalid choice: 'frobnicate'" in err and "'run'" in err and "'convert'" in err


def test_missing_required_arguments_are_named(capsys):
    code, _, err = run_cli(["sft"], capsys)
    assert code == 2
    assert "jaxsr sft" in err and "required" in err and "--data" in err


@pytest.mark.parametrize("override, expected", [
    ("dpo.bta=0.1", "unknown key 'dpo.bta'; did you mean 'dpo.beta'?"),
    ("sft.batch_size=abc", "'sft.batch_size'"),
    ("sft.batch_size", "override 'sft.batch_size' must look like key.sub=value"),
])
def test_run_with_a_bad_override_says_which_without_a_traceback(override, expected, capsys):
    code, _, err = run_cli(["run", "--config", TINY, override], capsys)
    assert code != 0
    assert expected in err and "jaxsr run: error:" in err
    assert "Traceback" not in err


def test_run_with_a_missing_config_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = run_cli(["run", "--config", str(missing)], capsys)
    assert code != 0 and str(missing) in err and "Traceback" not in err


def test_convert_of_a_missing_directory_names_it(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    code, _, err = run_cli(["convert", str(missing), str(tmp_path / "out")], capsys)
    assert code != 0
    assert f"{missing}: no such model directory" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["convert", "--help"]])
def test_help_exits_zero(argv, capsys):
    code, out, _ = run_cli(argv, capsys)
    assert code == 0 and "usage: jaxsr" in out


def test_no_command_prints_help(capsys):
    code, out, _ = run_cli([], capsys)
    assert code == 0 and "usage: jaxsr" in out
