"""A non-editable install works without the repository: the wheel carries the package and its presets."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_the_wheel_ships_the_presets_and_runs_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # (a build writes build/ beside the sources: not into the repository)
    shutil.copytree(REPO / "transrec", source / "transrec", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("transrec-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, cwd=tmp_path)
    # the installed copy first on the path (the dependencies come from this environment), run from elsewhere
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = ("import transrec, transrec.config as c; "
             "print(transrec.__file__); print(len([c.load_config(name) for name in c.preset_names()]))")
    result = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    where, presets = result.stdout.split()
    assert Path(where).is_relative_to(site) and int(presets) >= 6
    demo = subprocess.run([sys.executable, "-m", "transrec.launcher.cli", "demo", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert demo.returncode == 0 and "--workdir" in demo.stdout
