"""The scripts' command line as a user meets it: `--help` (fast, grouped, every flag explained, defaults shown),
negative numbers as values, and a bad flag ending in one line and exit code 2 (issue 20, items 9 and 10)."""

import os
import subprocess
import sys

import pytest
from test_train_phased_dmd import SCRIPTS, _load_script


NAMES = ["train_phased_dmd_qwen_image", "train_phased_dmd_wan22"]
REQUIRED = ["--pretrained_model_name_or_path", "x", "--prompts", "p"]


def _parser(name):
    return _load_script(name).make_parser()


def _run(name, *argv, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPTS / f"{name}.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_flag_has_help_a_group_and_its_default_shown(name):
    parser = _parser(name)
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) > 60
    assert [a.option_strings[0] for a in flags if not (a.help or "").strip()] == []
    # every flag sits in a named group, not in argparse's catch-all "options"
    grouped = {
        id(a)
        for g in parser._action_groups
        if g.title not in ("options", "positional arguments")
        for a in g._group_actions
    }
    assert [a.option_strings[0] for a in flags if id(a) not in grouped] == []
    text = parser.format_help()
    assert "(default: 5e-05)" in text and "(default: phased_dmd)" in text and "(default: 5)" in text
    assert "docs/training.md" in parser.epilog


def test_guidance_scale_2_only_in_the_wan_script():
    assert "--guidance_scale_2" not in _parser("train_phased_dmd_qwen_image").format_help()
    assert "--guidance_scale_2" in _parser("train_phased_dmd_wan22").format_help()
    with pytest.raises(SystemExit):
        _load_script("train_phased_dmd_qwen_image").parse_args([*REQUIRED, "--guidance_scale_2", "3"])


def test_help_imports_neither_torch_nor_diffusers():
    """`--help` answers without the heavy imports (8.5 s before, most of it torch and diffusers)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPTS / 'train_phased_dmd_wan22.py')!r}, '--help']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate', 'peft') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "usage:" in out.stdout and "docs/training.md" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("value", ["-1e-4", "-5e-05", "-0.001", "-2"])
def test_negative_learning_rate_is_refused_naming_the_flag(value):
    from diffusers_pdmd.training.cli import check_args

    args = _load_script("train_phased_dmd_qwen_image").parse_args([*REQUIRED, "--learning_rate", value])
    assert args.learning_rate == float(value)
    with pytest.raises(ValueError, match=r"`--learning_rate` must be > 0"):
        check_args(args)


def test_user_error_is_one_line_and_exit_code_2(tmp_path):
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--prompts", str(tmp_path / "p.txt")]
    (tmp_path / "p.txt").write_text("a cat\n")
    done = _run("train_phased_dmd_qwen_image", *argv, "--learning_rate", "-1e-4", "--output_dir", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "--learning_rate" in lines[0], done.stderr
    # under `accelerate launch` every process fails alike: only the main one (RANK 0) prints
    other = _run("train_phased_dmd_qwen_image", *argv, "--learning_rate", "-1e-4", env={"RANK": "1"})
    assert other.returncode == 2 and other.stderr.strip() == ""


def test_user_error_under_two_processes_is_printed_once(tmp_path):
    """Two processes (torch.distributed.run, as `accelerate launch` starts them) meet the same bad flag: one line.

    The launcher then adds its own report of the failed children (torch's ChildFailedError); that is not ours.
    """
    (tmp_path / "p.txt").write_text("a cat\n")
    argv = ["--pretrained_model_name_or_path", str(tmp_path), "--prompts", str(tmp_path / "p.txt")]
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547"]
        + [str(SCRIPTS / "train_phased_dmd_qwen_image.py"), *argv, "--learning_rate", "-1e-4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"},
    )
    assert done.returncode != 0
    ours = [
        line for line in (done.stdout + done.stderr).splitlines() if "train_phased_dmd_qwen_image.py: error:" in line
    ]
    assert ours == ["train_phased_dmd_qwen_image.py: error: `--learning_rate` must be > 0, got -0.0001."]
