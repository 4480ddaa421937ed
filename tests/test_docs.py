"""The CPU recipes of docs/pipeline.md run as written (their `tempfile` folders made inside the test's folder)."""

import importlib.util
import pathlib
import re
import runpy
import shlex
import sys
import tempfile

import pytest


DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "pipeline.md"


def _recipes() -> dict[str, list[tuple[str, str]]]:
    """`### <family>` subsection of "## Try it on the CPU" -> its fenced blocks, as (language, code)."""
    text = DOC.read_text()
    section = text.split("## Try it on the CPU", 1)[1].split("\n## ", 1)[0]
    recipes = {}
    for part in section.split("\n### ")[1:]:
        title, body = part.split("\n", 1)
        recipes[title.strip()] = re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S)
    return recipes


RECIPES = _recipes()


def test_there_is_a_recipe_per_family():
    assert list(RECIPES) == ["Qwen-Image", "Wan2.2 T2V-A14B", "Wan2.2 I2V-A14B", "Wan2.2 TI2V-5B"]
    assert all([lang for lang, _ in blocks] == ["python"] for blocks in RECIPES.values())


@pytest.mark.parametrize("title", list(RECIPES))
def test_cpu_recipe_writes_into_a_folder_of_its_own(title):
    code = RECIPES[title][0][1]
    assert "/tmp" not in code and "tempfile.mkdtemp(" in code  # not a fixed name in the shared temp folder


@pytest.mark.parametrize("title", list(RECIPES))
def test_cpu_recipe_runs(title, tmp_path, monkeypatch):
    blocks = RECIPES[title]
    if any("export_to_video" in code for _, code in blocks) and importlib.util.find_spec("imageio") is None:
        pytest.skip('export_to_video needs imageio: pip install -e ".[video]" (part of the dev extra)')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the recipe's mkdtemp folder inside the test's
    for lang, code in blocks:
        if lang == "bash":
            for line in code.strip().splitlines():
                argv = shlex.split(line)
                assert argv[:2] == ["python", "-m"], line
                monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
                monkeypatch.delitem(sys.modules, argv[2], raising=False)  # run it fresh, as `python -m` does
                with pytest.raises(SystemExit) as done:  # `python -m` in this process (no second torch import)
                    runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
                assert done.value.code == 0, line
        else:
            exec(compile(code, f"{DOC.name}: {title}", "exec"), {})
    written = sorted(p.name for p in tmp_path.rglob("*") if p.suffix in (".png", ".mp4"))
    assert written, "the recipe saves its sample"


def test_style_lora_recipe_runs(tmp_path, monkeypatch):
    """The CPU recipe of "My style LoRA + the experts"."""
    section = DOC.read_text().split("## My style LoRA + the experts", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section.split("### On the CPU", 1)[1], flags=re.S)
    assert [lang for lang, _ in blocks] == ["bash", "python"]
    monkeypatch.chdir(tmp_path)
    for lang, code in blocks:
        code = code.replace("/tmp/", f"{tmp_path}/")
        if lang == "bash":
            argv = shlex.split(code.strip())
            monkeypatch.setattr(sys, "argv", [argv[2], *argv[3:]])
            monkeypatch.delitem(sys.modules, argv[2], raising=False)
            with pytest.raises(SystemExit) as done:
                runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
            assert done.value.code == 0
        else:
            exec(compile(code, f"{DOC.name}: style LoRA", "exec"), {})
    assert (tmp_path / "tiny-qwen-image-style.png").is_file()
