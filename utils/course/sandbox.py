"""A disposable sandbox for a learner's kernel: Debian's bubblewrap (`bwrap`).

Inside it, the learner's code sees the system, the course checkout, the virtual environment and the model cache
read-only; one private scratch folder (the notebook's copy and the grader's messages) is its only writable
place besides a size-capped /tmp; there is no network, its own process namespace (so nothing it starts outlives
it, and it cannot see or signal any process outside), and a fresh session (no terminal to type into).

    prefix = sandbox.command(scratch, hide=[...])    # ["bwrap", ..., "--"]; then the kernel's own argv

Memory and time limits are the grader's: utils/course/notebooks.py kills the sandbox when it outgrows its memory
limit or a cell runs past its time limit.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from utils.course.notebooks import ROOT

TMP_BYTES = 512 * 2**20  # the sandbox's /tmp is a tmpfs (memory): cap it
# System folders the interpreter and its libraries need, read-only; a folder missing on this system is skipped.
SYSTEM = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt", "/sys"]
# From /etc, only what a Python process needs (no host secrets: shadow, ssh keys, machine credentials).
ETC = ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf",
       "/etc/localtime", "/etc/os-release", "/etc/alternatives", "/etc/ssl", "/etc/mime.types"]
INSTALL_HINT = ("The grader runs each notebook in a bubblewrap sandbox. Install it (Debian/Ubuntu: "
                "`sudo apt-get install bubblewrap`), or, only for notebooks you trust, pass --no-sandbox.")


class SandboxUnavailable(RuntimeError):
    """No working bwrap on this machine; the message says what to do."""


def _bwrap() -> str | None:
    return shutil.which("bwrap")


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """None when sandboxes work here; otherwise why not, with what to do (macOS and Windows have no bwrap)."""
    if not sys.platform.startswith("linux"):
        return f"This is {sys.platform}, which has no bubblewrap sandbox. " + INSTALL_HINT
    bwrap = _bwrap()
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed. " + INSTALL_HINT
    probe = [bwrap, *_mounts([]), "--unshare-all", "--die-with-parent", "--", "/bin/true"]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bwrap did not run ({error}). " + INSTALL_HINT
    if done.returncode != 0:
        return (f"bwrap cannot create a sandbox here ({done.stderr.strip()[:300]}); this machine may forbid "
                f"unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1). " + INSTALL_HINT)
    return None


def available() -> bool:
    return unavailable_reason() is None


def _readonly_paths() -> list[Path]:
    """The course, the interpreter's environments and the model cache, as the kernel needs them."""
    from utils.models import cache_dir

    paths = [ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.executable).resolve().parent, cache_dir()]
    paths += [Path(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return paths


def _mounts(readonly: list[Path]) -> list[str]:
    # Order matters (a later mount covers an earlier one): /tmp first, so that folders under /tmp stay visible.
    args = ["--proc", "/proc", "--dev", "/dev", "--size", str(TMP_BYTES), "--tmpfs", "/tmp"]
    for path in SYSTEM + ETC:
        if os.path.islink(path):  # e.g. /lib -> usr/lib on merged-/usr systems
            args += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            args += ["--ro-bind", path, path]
    seen: list[str] = []
    for path in readonly:
        real = str(path.resolve())
        if not path.exists() or any(real == root or real.startswith(root + "/") for root in seen):
            continue
        seen.append(real)
        args += ["--ro-bind", real, real]
    return args


def command(scratch: Path, cwd: Path, hide: list[Path] = ()) -> list[str]:
    """The bwrap prefix for a kernel whose only writable folder is `scratch` (it must exist), started in `cwd`.

    hide: files (e.g. every submission being graded, earlier reports) that must not be readable inside even
    when they lie in a mounted folder; each is covered by an empty file.
    """
    reason = unavailable_reason()
    if reason:
        raise SandboxUnavailable(reason)
    scratch = scratch.resolve()
    args = [_bwrap(), *_mounts(_readonly_paths()), "--bind", str(scratch), str(scratch)]
    for path in hide:
        path = Path(path).resolve()
        if path.is_file() and not str(path).startswith(str(scratch) + "/"):
            args += ["--ro-bind", "/dev/null", str(path)]
        elif path.is_dir() and not str(scratch).startswith(str(path)):
            args += ["--tmpfs", str(path)]
    # ipykernel exits when its parent looks gone (ppid 1), which inside a pid namespace it always is.
    args += ["--unsetenv", "JPY_PARENT_PID"]
    args += ["--remount-ro", "/"]  # the sandbox's own root is a tmpfs (memory): nothing may be written there
    return args + ["--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
                   "--hostname", "sandbox", "--chdir", str(cwd.resolve()), "--"]
