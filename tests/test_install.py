"""Installing: which DALI wheel scripts/install.sh picks (a fake nvidia-smi, a fake torch CUDA version),
the extras and pins in pyproject.toml, which PIL build is in use, and the built wheel installed into
a new environment outside the clone."""

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "choose_dali.py"
spec = importlib.util.spec_from_file_location("choose_dali", SCRIPT)
choose_dali = importlib.util.module_from_spec(spec)
spec.loader.exec_module(choose_dali)

GPU_LINE = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0b1c2d3e-0000-0000-0000-000000000000)"
ON_DALI_PLATFORM = (platform.system(), platform.machine()) in choose_dali.DALI_PLATFORMS
needs_dali_platform = pytest.mark.skipif(not ON_DALI_PLATFORM, reason="auto picks no DALI off Linux x86_64/aarch64")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+ (tomllib)")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def fake_nvidia_smi(tmp_path: Path, stdout: str, status: int = 0) -> Path:
    path = tmp_path / "nvidia-smi"
    path.write_text(f"#!/bin/sh\n[ \"$1\" = -L ] || exit 64\nprintf '%s\\n' '{stdout}'\nexit {status}\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize(("cuda", "extra"), [("13.0", "gpu-cu13"), ("13.2", "gpu-cu13"), ("12.8", "gpu-cu12"),
                                             ("12.4", "gpu-cu12")])
def test_wheel_follows_torch_cuda_major(cuda, extra):
    assert choose_dali.choose("auto", cuda, [GPU_LINE], "Linux", "x86_64")[0] == extra


@pytest.mark.parametrize(("want", "cuda", "gpus", "system", "why"), [
    ("auto", "13.0", [], "Linux", "no NVIDIA GPU"),
    ("auto", None, [GPU_LINE], "Linux", "torch is a CPU build"),
    ("auto", "11.8", [GPU_LINE], "Linux", "CUDA 11.8"),
    ("auto", "13.0", [GPU_LINE], "Darwin", "no DALI wheel for Darwin"),
    ("none", "13.0", [GPU_LINE], "Linux", "GRR_DALI=none"),
])
def test_no_dali_and_why(want, cuda, gpus, system, why):
    extra, reason = choose_dali.choose(want, cuda, gpus, system, "x86_64")
    assert extra is None and why in reason


def test_explicit_choice_needs_no_gpu():
    # what .ci/run uses to test DALI's CPU path on a CPU machine
    assert choose_dali.choose("cu12", None, [], "Linux", "x86_64")[0] == "gpu-cu12"
    assert choose_dali.choose("cu13", None, [], "Linux", "x86_64")[0] == "gpu-cu13"
    with pytest.raises(ValueError, match="GRR_DALI='gpu'"):
        choose_dali.choose("gpu", "13.0", [GPU_LINE], "Linux", "x86_64")


def test_gpus_are_what_nvidia_smi_lists(tmp_path):
    assert choose_dali.list_gpus(str(fake_nvidia_smi(tmp_path, GPU_LINE))) == [GPU_LINE]
    # a driver that is installed but cannot reach a GPU fails, and says so on stdout
    failing = fake_nvidia_smi(tmp_path, "NVIDIA-SMI has failed because it could not communicate with the "
                              "NVIDIA driver.", status=9)
    assert choose_dali.list_gpus(str(failing)) == []
    assert choose_dali.list_gpus(str(fake_nvidia_smi(tmp_path, "No devices found."))) == []
    assert choose_dali.list_gpus(str(tmp_path / "missing")) == []
    assert choose_dali.list_gpus(None) == []


def _run_script(*args, env=None):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    return result.returncode, result.stdout.strip(), result.stderr.strip()


@needs_dali_platform
def test_script_with_a_fake_nvidia_smi(tmp_path):
    smi = str(fake_nvidia_smi(tmp_path, GPU_LINE))
    assert _run_script("--nvidia-smi", smi, "--torch-cuda", "13.0", "--want", "auto")[1] == "gpu-cu13"
    assert _run_script("--nvidia-smi", smi, "--torch-cuda", "12.6", "--want", "auto")[1] == "gpu-cu12"
    status, out, err = _run_script("--nvidia-smi", str(tmp_path / "absent"), "--torch-cuda", "13.0",
                                   "--want", "auto")
    assert (status, out) == (0, "") and "no NVIDIA GPU" in err
    assert _run_script("--nvidia-smi", smi, "--torch-cuda", "13.0", env={"GRR_DALI": "none"})[1] == ""
    status, _, err = _run_script("--torch-cuda", "13.0", env={"GRR_DALI": "yes"})
    assert status == 2 and err.startswith("error: GRR_DALI='yes'")


def _fake_venv(tmp_path: Path, cuda: str, old_grr: bool) -> tuple[Path, Path]:
    """A copy of install.sh whose .venv/bin/python logs every pip call (and installs nothing), and
    answers choose_dali.py as if torch were built for `cuda`; everything else runs the real Python."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("install.sh", "choose_dali.py"):
        (root / "scripts" / name).write_text((REPO / "scripts" / name).read_text())
    (root / "grr_data").symlink_to(REPO / "grr_data")
    log = tmp_path / "pip.log"
    old = f'echo "Editable project location: {root}"; exit 0' if old_grr else "exit 1"
    python = root / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/bin/bash
if [ "$1 $2" = "-m pip" ]; then
    echo "${{*:3}}" >> {log}
    if [ "$3 $4" = "show grr" ]; then {old}; fi
    [ "$3" != show ] || exit 1
    exit 0
fi
if [ "$1" = scripts/choose_dali.py ]; then shift; exec {sys.executable} scripts/choose_dali.py --torch-cuda {cuda} "$@"; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    return root, log


@pytest.mark.slow  # each run imports torch twice
@needs_dali_platform
@pytest.mark.parametrize(("gpu", "cuda", "dali"), [(False, "13.0", ""), (True, "13.0", ",gpu-cu13"),
                                                   (True, "12.4", ",gpu-cu12"), (True, "none", "")])
def test_install_sh_installs_dali_only_with_a_gpu(tmp_path, gpu, cuda, dali):
    root, log = _fake_venv(tmp_path, cuda, old_grr=gpu)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        fake_nvidia_smi(bin_dir, GPU_LINE)
    env = {k: v for k, v in os.environ.items() if k not in ("GRR_DALI", "GRR_EXTRAS", "GRR_SIMD")}
    env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
    result = subprocess.run(["bash", str(root / "scripts" / "install.sh")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    installs = [c for c in calls if c.startswith("install") and "-e" in c.split()]
    assert installs == [f"install --quiet -e .[dev,tensorboard,s3{dali}]"]
    assert not any("torch" in c for c in calls), "an installed torch must be kept"
    assert ("uninstall --quiet -y grr" in calls) == gpu  # the old distribution name, only where installed
    assert "PIL: " in result.stdout and "tensorboard: " in result.stdout


def test_pyproject_extras_and_pins():
    project = pyproject()["project"]
    assert project["name"] == "grr-coca" and project["scripts"] == {"grr": "grr_cli.main:app"}
    extras = project["optional-dependencies"]
    assert set(choose_dali.EXTRAS.values()) <= set(extras)
    assert "simd" not in extras and "gpu" not in extras
    for extra, wheel in (("gpu-cu12", "nvidia-dali-cuda120"), ("gpu-cu13", "nvidia-dali-cuda130")):
        (req,) = [Requirement(r) for r in extras[extra]]
        assert req.name == wheel
        # the floor must exclude the placeholders: cuda120 1.40 and 1.52, cuda130 1.51.2 (1.6 kB sdists)
        for placeholder in ("1.40.0", "1.52.0", "1.51.2"):
            assert not req.specifier.contains(placeholder)
        assert req.specifier.contains("1.53.0") and req.specifier.contains("2.4.0")
    assert any(Requirement(r).name == "tensorboard" for r in extras["tensorboard"])
    # object storage: the s3 extra (installed by default) and moto's server for its tests
    assert {Requirement(r).name for r in extras["s3"]} == {"s3fs", "boto3"}
    assert any(Requirement(r).name == "moto" and "server" in Requirement(r).extras for r in extras["dev"])


def test_transformers_pin_is_the_installed_major():
    (req,) = [Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == "transformers"]
    installed = Version(metadata.version("transformers"))
    assert req.specifier.contains(installed), f"transformers {installed} does not satisfy {req}"
    # one major only: 4.x and 5.x tokenize a literal <bos> in a caption differently
    assert not req.specifier.contains(f"{installed.major - 1}.99") and not req.specifier.contains(f"{installed.major + 1}.0")


def test_pil_build_names_the_build_in_use():
    import PIL

    from grr_data.infra.pil_info import describe_pil_build, pil_build

    info = pil_build()
    assert info["version"] == PIL.__version__
    assert info["build"] in ("Pillow", "pillow-simd")
    assert info["installed"][info["build"]] == PIL.__version__
    assert describe_pil_build().startswith(f"PIL: {info['build']} {PIL.__version__} (")


def test_pil_build_when_both_are_installed(monkeypatch):
    import PIL

    from grr_data.infra import pil_info

    versions = {"Pillow": PIL.__version__, "pillow-simd": "9.5.0.post2"}
    monkeypatch.setattr(pil_info, "_installed", versions.get)
    info = pil_info.pil_build()
    assert info["build"] == "Pillow" and "both" in info["warning"] and "GRR_SIMD=1" in info["warning"]
    versions["Pillow"], versions["pillow-simd"] = "10.0.0", PIL.__version__
    assert pil_info.pil_build()["build"] == "pillow-simd"


def test_licence_changelog_and_typed_markers():
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    licence = (REPO / "LICENSE").read_text()
    assert licence.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in licence
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "\n## Unreleased\n" in changelog and f"\n## {project['version']}\n" in changelog
    package_data = pyproject()["tool"]["setuptools"]["package-data"]
    for package in ("grr_data", "grr_train"):
        assert (REPO / package / "py.typed").is_file() and "py.typed" in package_data[package]


# ---------------------------------------------------------------- the built wheel, installed elsewhere

_SKIP_ANYWHERE = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache")
# outputs a checkout may hold at its top; only there: grr_train/runs and grr_train/demo are packages
_SKIP_AT_TOP = {"build", "dist", "runs", "demo", "reports", "out", "data"}


def skip_in_copy(folder: str, names: list[str]) -> set[str]:
    top = _SKIP_AT_TOP.intersection(names) if Path(folder) == REPO else set()
    return set(_SKIP_ANYWHERE(folder, names)) | top


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


def _venv_with_this_pythons_packages(venv: Path) -> Path:
    """A new virtual environment whose own site-packages come first, then this interpreter's
    (torch and the other dependencies, so nothing is downloaded): what `--system-site-packages`
    gives over a system Python. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    here = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (_site_packages(venv) / "dependencies.pth").write_text("\n".join(here) + "\n")
    return venv / "bin" / "python"


@pytest.mark.slow  # builds a wheel, makes a venv, fetches, shards, trains and captions: about two minutes
def test_the_wheel_installs_and_runs_outside_the_clone(tmp_path):
    """`pip install` of the built wheel into a new environment, used from a folder outside the
    clone: the grr it runs is the installed one, and the manifests and tokenizer assets came with it."""
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=skip_in_copy)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("grr_coca-*.whl")
    python = _venv_with_this_pythons_packages(tmp_path / "venv")
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, timeout=600)
    work = tmp_path / "work"
    work.mkdir()
    bin_dir = tmp_path / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRR_MANIFESTS")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", HF_HUB_OFFLINE="1")

    def run(*args, timeout=600):
        result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=work, env=env,
                                timeout=timeout)
        assert result.returncode == 0, f"{args}: {result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    where = json.loads(run(python, "-c", "import json, grr_cli, grr_data, grr_train, grr_data.fetch.catalog as m; "
                                         "print(json.dumps([grr_cli.__file__, grr_data.__file__, grr_train.__file__, "
                                         "str(m.manifests_dir())]))"))
    installed = str(_site_packages(tmp_path / "venv"))
    assert all(path.startswith(installed) for path in where[:3]), where
    assert where[3] == str(tmp_path / "venv" / "share" / "grr" / "manifests"), where
    for package in ("grr_data", "grr_train"):
        assert (Path(installed) / package / "py.typed").is_file()
    assert (Path(installed) / "grr_data" / "assets" / "sample-tokenizer" / "spiece.model").is_file()
    assert run(bin_dir / "grr", "--version").strip() == f"grr {pyproject()['project']['version']}"
    assert run(python, "-m", "grr_cli", "--version") == run(bin_dir / "grr", "--version")

    run(bin_dir / "grr", "data", "fetch", "shapes", "--out", "fetched", "--num-pairs", "40", "--workers", "1")
    tokenizer = json.loads((work / "fetched" / "fetch_manifest.json").read_text())["shapes"]["tokenizer"]
    run(bin_dir / "grr", "data", "shard", "--input", "fetched", "--out", "shards", "--tokenizer",
        f"fetched/{tokenizer}", "--workers", "1")
    settings = ["per_device_batch_size=4", "global_batch_size=4", "num_workers=0", "loader=cpu", "val_split=none",
                "tensorboard=false", "warmup_steps=1", "compile=off", "checkpoint_every=2"]
    run(bin_dir / "grr", "train", "pretrain", "--preset", "grr-tiny", "--data", "shards", "--out", "run",
        "--max-steps", "2", *[a for s in settings for a in ("--set", s)])
    from PIL import Image

    Image.new("RGB", (300, 300), (200, 30, 30)).save(work / "red.jpg")
    captioned = run(bin_dir / "grr", "caption", "red.jpg", "--ckpt", "run", "--device", "cpu")
    assert captioned.startswith("red.jpg: ") and len(captioned.splitlines()) == 1
    run(bin_dir / "grr", "export", "run", "--out", "export")
    assert run(bin_dir / "grr", "caption", "red.jpg", "--ckpt", "export", "--device", "cpu") == captioned
