"""Installing and starting ptrain: the `ptrain` console script (in-process and installed into a throwaway folder),
launch/wheelhouse.sh's pip commands (rendered, no network), launch/setup.sh's offline options, and
--report_to wandb without wandb installed."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ptrain.cli import main as cli_main
from ptrain.config import ConfigError, parse_config

REPO = Path(__file__).resolve().parents[1]


def test_cli_subcommands_help(capsys):
    assert cli_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "ptrain plan" in out and "dry-run" in out and "--no-python ptrain" in out
    with pytest.raises(SystemExit) as e:
        cli_main(["plan", "--help"])
    assert e.value.code == 0 and "--model_dir" in capsys.readouterr().out
    for argv in (["dry-run", "--help"], ["train", "--help"], ["--pretrained_model_name_or_path", "x", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0 and "--pretrained_model_name_or_path" in capsys.readouterr().out


def test_cli_dry_run_and_errors(tiny_ckpt, tiny_data, single_process_env, capsys):
    assert cli_main(["dry-run", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                     "--height", "32", "--width", "32", "--num_frames", "9"]) == 0  # fmt: skip
    assert "ptrain dry run: config, parallel degrees and data are valid" in capsys.readouterr().out
    assert cli_main(["--pretrained_model_name_or_path", "/nope", "--data_root", str(tiny_data)]) == 2
    assert "/nope: no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_installed_console_script(tmp_path):
    """pip installs the package into a throwaway folder; its `ptrain` script runs --help and plan --help."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"ptrain": "ptrain.cli:main"}
    target, build = tmp_path / "target", tmp_path / "src"
    shutil.copytree(REPO, build, ignore=shutil.ignore_patterns(".venv", ".git", "tests", "benchmarks", "*_out"))
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(build)], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    script = target / "bin" / "ptrain"
    env = {**os.environ, "PYTHONPATH": str(target)}
    for argv, expect in ((["--help"], "ptrain plan"), (["plan", "--help"], "--model_dir"),
                         (["dry-run", "--help"], "--dry_run")):  # fmt: skip
        p = subprocess.run([sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and expect in p.stdout, p.stderr
    # torchrun starts the script itself (the README's `torchrun ... --no-python ptrain`).
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--no-python"]
    p = subprocess.run([*run, str(script), "--help"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert p.returncode == 0 and "ptrain plan" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-c", "import ptrain; print(ptrain.__file__)"], env=env, cwd=tmp_path,
                       capture_output=True, text=True)  # fmt: skip
    assert p.stdout.startswith(str(target)), p.stdout  # the installed copy ran, not a checkout


def test_wheelhouse_renders_its_pip_commands(tmp_path):
    p = subprocess.run(["bash", str(REPO / "launch" / "wheelhouse.sh"), str(tmp_path / "wh"), "--python-version",
                        "3.12", "--platform", "manylinux2014_x86_64", "--extras", "wandb", "--print"],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    resolve, download = p.stdout.strip().splitlines()
    target = "--only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64"
    assert "-m pip install --dry-run --ignore-installed --quiet --report " in resolve and target in resolve
    assert "'diffusers>=0.42.1,<0.43'" in resolve and "'wandb>=0.18'" in resolve and "setuptools>=77" in resolve
    assert not re.search(r"'torch[<>=]", resolve) and "'torchdata>=0.11,<0.12'" in resolve  # torch itself never comes
    assert f"-m pip download --no-deps {target} -d {tmp_path / 'wh'}" in download
    assert not (tmp_path / "wh").exists()


def test_wheelhouse_keeps_torch_and_the_images_packages_out():
    """The closure of a pip installation report (format version 1, the fields pip writes) skips torch's subtree
    and packages the image has at an accepted version."""
    spec = importlib.util.spec_from_file_location("wheelhouse", REPO / "launch" / "wheelhouse.py")
    wh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wh)

    def pkg(name, version, *requires):
        return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}

    report = {"version": "1", "install": [
        pkg("peft", "0.21.0", "torch>=1.13", "safetensors", "pytest; extra == 'test'"),
        pkg("torch", "2.13.0", "sympy>=1.13", "nvidia-cublas-cu12==12.8; platform_system == 'Linux'"),
        pkg("sympy", "1.14.0"), pkg("nvidia-cublas-cu12", "12.8"), pkg("safetensors", "0.7.0"),
        pkg("pillow", "12.0.0"), pkg("tyro", "1.0.3", "typeguard>=4"), pkg("typeguard", "4.4.0"),
    ]}  # fmt: skip
    pins, kept = wh.closure(report, ["peft>=0.21", "pillow>=10", "tyro>=1"], {"pillow": "11.0.0", "typeguard": "2.0"})
    assert pins == ["peft==0.21.0", "safetensors==0.7.0", "typeguard==4.4.0", "tyro==1.0.3"]
    assert kept == ["pillow"]  # the image's pillow 11 satisfies >=10; its typeguard 2.0 does not


def test_setup_offline_options_fail_clearly(tmp_path):
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "setup.sh", repo / "launch")
    shutil.copy(REPO / "pyproject.toml", repo)

    def setup(*args):
        return subprocess.run(["bash", str(repo / "launch" / "setup.sh"), *args], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable}, timeout=120)  # fmt: skip

    p = setup("--wheelhouse", str(tmp_path / "none"))
    assert p.returncode == 2 and "--wheelhouse" in p.stderr and "no such folder" in p.stderr
    assert setup("--bogus").returncode == 2
    # A venv over the system site-packages of a python without torch: refused, nothing installed.
    base = subprocess.run([sys.executable, "-c", "import sys; print(sys.base_prefix)"], capture_output=True,
                          text=True).stdout.strip()  # fmt: skip
    base_py = Path(base) / "bin" / "python3"
    if subprocess.run([str(base_py), "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("the base python has torch")
    (tmp_path / "wh").mkdir()
    p = subprocess.run(["bash", str(repo / "launch" / "setup.sh"), "--wheelhouse", str(tmp_path / "wh"),
                        "--system-torch"], capture_output=True, text=True, env={**os.environ, "PYTHON": str(base_py)},
                       timeout=300)  # fmt: skip
    assert p.returncode == 2 and "--system-torch: the system python has no torch" in p.stderr, p.stderr
    assert "include-system-site-packages = true" in (repo / ".venv" / "pyvenv.cfg").read_text()


def test_report_to_wandb_without_wandb_names_the_extra(tiny_ckpt, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # Python's own way to make an import fail: as if not installed
    for to in ("wandb", "all"):
        cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                            "--report_to", to])  # fmt: skip
        with pytest.raises(
            ConfigError, match=rf"--report_to {to}: wandb is not installed: pip install 'ptrain\[wandb\]'"
        ):
            cfg.validate()


def test_report_to_wandb_offline_logs_the_metrics(tiny_ckpt, tiny_data, tmp_path, monkeypatch, single_process_env):
    """--report_to wandb with WANDB_MODE=offline: a wandb run under output_dir/wandb that logged every step's loss,
    as metrics.jsonl has it (wandb is in the test extra)."""
    import json

    from conftest import TINY_ARGS

    from ptrain.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "2", "--checkpointing_steps", "2",
                        *TINY_ARGS, "--report_to", "wandb"])  # fmt: skip
    train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((tmp_path / "wandb").rglob("*"))
    # The run file holds protobuf history and summary records; an item is a key and its value as JSON (field 16):
    # `\n <len> train/loss \x82\x01 <len> <json>`.
    data = runs[0].read_bytes()
    logged = [
        float(data[m.end() + 1 : m.end() + 1 + data[m.end()]]) for m in re.finditer(rb"\ntrain/loss\x82\x01", data)
    ]
    assert sorted(set(logged)) == pytest.approx(sorted(losses)) and len(losses) == 2  # history (+ summary) records
    # The fifth audit: a resumed run was a new wandb run per restart. It continues its run (the same id).
    first_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].parent.name.endswith("-" + first_id)
    cfg.train.train_steps, cfg.train.num_train_epochs = 3, None
    train(cfg)
    assert {p.name.rsplit("-", 1)[1] for p in (tmp_path / "wandb").glob("offline-run-*")} == {first_id}
