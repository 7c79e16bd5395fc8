"""The wheel carries every data file the library reads at run time.

An editable install reads files from the checkout, so a file missing from ``package-data`` only shows up
for users who ``pip install`` the wheel (the demo's passage was one: `butler-zoo demo` failed there).
"""
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_new_enough():
    try:
        major = int(version("setuptools").split(".")[0])
    except Exception:  # not installed: pip builds in an isolated environment instead
        return False
    return major >= 77


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # from a copy without build outputs: setuptools reuses build/ and *.egg-info/SOURCES.txt, which
    # would hide a file missing from package-data on a checkout that was built before
    src = out / "src"
    leave_out = shutil.ignore_patterns(".git", ".venv*", ".carry", "build", "dist", "*.egg-info", "__pycache__",
                                       "butler-eval", ".whl", ".pytest_cache", "data", "runs", ".gpu")
    shutil.copytree(ROOT, src, ignore=leave_out)
    # without isolation when the venv has the build backend (no download); else pip fetches it
    isolation = ["--no-build-isolation"] if _setuptools_new_enough() else []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation, "-w", str(out), str(src)],
                   check=True, cwd=out)
    (wheel,) = out.glob("butler_zoo-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def _package_files(package):
    """Files of a package directory in the checkout, as paths in the wheel (caches and bytecode left out)."""
    base = ROOT / package
    files = set()
    for path in base.rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            files.add(path.relative_to(ROOT).as_posix())
    return files


@pytest.mark.parametrize("package", ["butler_zoo", "kernels/butler_kernels", "integrations/sglang/butler_sglang"])
def test_wheel_has_every_file_of_the_package(wheel_names, package):
    files = _package_files(package)
    if not files:
        pytest.skip(f"{package} is not in this checkout")
    prefix = package.rsplit("/", 1)[0] + "/" if "/" in package else ""
    in_wheel = {f[len(prefix):] for f in files}
    missing = sorted(in_wheel - wheel_names)
    assert not missing, f"files of {package} missing from the wheel (add them to package-data in pyproject.toml): {missing}"


def test_wheel_has_the_demo_passage_and_shipped_predictor(wheel_names):
    assert "butler_zoo/demo_data/genesis_1-4_kjv.txt" in wheel_names
    assert "butler_zoo/predictors/SmolLM2-135M-Instruct-butler/model.safetensors" in wheel_names
