"""tpu_scripts/*.sh under DRY_RUN=1: the gcloud commands they print, that they never call gcloud, and that the
remote command run.sh builds really runs the user's command with its arguments intact."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "tpu_scripts"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "copy_logs.sh", "delete.sh"]
POD_ENV = {"TPU_NAME": "test-pod", "TPU_ZONE": "europe-west4-a", "TPU_ACCELERATOR": "v5p-16"}
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
IGSEARCH = [
    "python",
    "-m",
    "experiments.igsearch",
    "--config=experiments/configs/igsearch.py:qwen2_5_3b_tpu",
    "--workdir=gs://bucket/run1",
]
# Arguments a careless join would break: spaces, both quote kinds, shell syntax, an empty argument.
AWKWARD = ['--note=it\'s a "quoted" note', "two words", "$HOME;`id`|&*", ""]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """The printed commands, as written (without the "+ " prefix)."""
        return [line[2:] for line in self.stderr.splitlines() if line.startswith("+ ")]

    @property
    def commands(self) -> list[list[str]]:
        """The printed commands, split back into argv as a shell would."""
        return [shlex.split(line) for line in self.lines]

    def gcloud(self, subcommand: str) -> list[list[str]]:
        return [c for c in self.commands if c[:5] == TPU_VM + [subcommand]]


def flag_value(argv: list[str], flag: str) -> str:
    values = [a[len(flag) + 1 :] for a in argv if a.startswith(flag + "=")]
    assert len(values) == 1, (flag, argv)
    return values[0]


class Sandbox:
    """Runs the scripts with a fake `gcloud` first on PATH (exits 99, records each call) and a scratch HOME."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.home = root / "home"
        self.cwd = root / "cwd"
        self.marker = root / "gcloud_was_called"
        for d in (self.bin, self.home, self.cwd):
            d.mkdir()
        fake = self.bin / "gcloud"
        fake.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(self.marker))}\nexit 99\n')
        fake.chmod(0o755)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_") and k not in ("DRY_RUN", "DETACH")}
        env["PATH"] = str(self.bin) + os.pathsep + env.get("PATH", "")
        env["HOME"] = str(self.home)
        env.update(overrides)
        return env

    def run(self, script: str, *args: str, dry_run: bool = True, **env: str) -> Result:
        overrides = {**POD_ENV, **({"DRY_RUN": "1"} if dry_run else {}), **env}
        proc = subprocess.run(
            [BASH, str(SCRIPTS_DIR / script), *args],
            env=self.env(**{k: v for k, v in overrides.items() if v is not None}),
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        result = Result(proc.returncode, proc.stdout, proc.stderr)
        if dry_run:
            assert not self.marker.exists(), f"{script} called gcloud under DRY_RUN=1: {self.marker.read_text()}"
        return result


@pytest.fixture
def sandbox(tmp_path: Path) -> Sandbox:
    return Sandbox(tmp_path)


def assert_ok(result: Result) -> None:
    assert result.returncode == 0, result.stderr


def assert_valid_shell(command: str) -> None:
    proc = subprocess.run([BASH, "-n", "-c", command], capture_output=True, text=True)
    assert proc.returncode == 0, (command, proc.stderr)


@pytest.mark.parametrize("script", SCRIPTS + ["common.sh"])
def test_script_is_executable_and_parses(script: str) -> None:
    path = SCRIPTS_DIR / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    proc = subprocess.run([BASH, "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean() -> None:
    paths = [str(SCRIPTS_DIR / s) for s in SCRIPTS + ["common.sh"]]
    proc = subprocess.run(["shellcheck", "-x", *paths], cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_create(sandbox: Sandbox) -> None:
    result = sandbox.run("create.sh")
    assert_ok(result)
    assert result.lines[0].startswith(
        "gcloud compute tpus tpu-vm create test-pod --zone=europe-west4-a --accelerator-type=v5p-16"
    )
    assert result.commands == [
        TPU_VM
        + ["create", "test-pod", "--zone=europe-west4-a", "--accelerator-type=v5p-16", "--version=tpu-ubuntu2204-base"]
    ]


def test_create_defaults_spot_and_project(sandbox: Sandbox) -> None:
    result = sandbox.run(
        "create.sh",
        TPU_ZONE=None,
        TPU_ACCELERATOR=None,
        TPU_SPOT="1",
        TPU_PROJECT="my-proj",
        TPU_RUNTIME="v2-alpha-tpuv5",
    )
    assert_ok(result)
    (argv,) = result.commands
    assert argv[:6] == TPU_VM + ["create", "test-pod"]
    assert set(argv[6:]) == {
        "--zone=us-central2-b",
        "--accelerator-type=v4-32",
        "--version=v2-alpha-tpuv5",
        "--spot",
        "--project=my-proj",
    }


def test_delete(sandbox: Sandbox) -> None:
    result = sandbox.run("delete.sh")
    assert_ok(result)
    assert result.commands == [TPU_VM + ["delete", "test-pod", "--zone=europe-west4-a", "--quiet"]]


def test_setup_clones_repo_url(sandbox: Sandbox) -> None:
    result = sandbox.run("setup.sh", TPU_REPO_URL="https://example.com/me/jax_hd.git")
    assert_ok(result)
    assert len(result.commands) == len(result.gcloud("ssh")) == 2, result.lines
    remotes = []
    for argv in result.commands:
        assert argv[5] == "test-pod" and "--zone=europe-west4-a" in argv and "--worker=all" in argv
        remotes.append(flag_value(argv, "--command"))
        assert_valid_shell(remotes[-1])
    clone, install = remotes
    assert "git clone https://example.com/me/jax_hd.git ~/jax_hd" in clone
    assert "git -C ~/jax_hd pull --ff-only" in clone
    assert "cd ~/jax_hd" in install and "-m venv .venv" in install
    words = shlex.split(install)
    i = words.index("constraints.txt")
    assert words[i - 1 : i + 3] == ["-c", "constraints.txt", "-e", ".[tpu]"]
    j = max(k for k in range(i) if words[k] == "pip")
    assert words[j - 2 : j + 2] == [".venv/bin/python", "-m", "pip", "install"]


def test_setup_copies_local_checkout(sandbox: Sandbox) -> None:
    result = sandbox.run("setup.sh", TPU_REPO_DIR="~/code/jax hd")
    assert_ok(result)
    tar, scp, untar, install = result.commands
    assert tar[0] == "tar" and tar[tar.index("-C") + 1] == str(REPO_ROOT)
    assert {"--exclude=./.venv", "--exclude=./runs"} <= set(tar)
    archive = tar[tar.index("-czf") + 1]
    assert not Path(archive).exists(), "DRY_RUN=1 must not build the archive"
    assert scp[:5] == TPU_VM + ["scp"] and scp[5] == archive and "--worker=all" in scp
    assert scp[6] == "test-pod:jax_hd_src.tar.gz" and "--zone=europe-west4-a" in scp
    for argv in (untar, install):
        assert argv[:6] == TPU_VM + ["ssh", "test-pod"] and "--worker=all" in argv
        assert_valid_shell(flag_value(argv, "--command"))
    # The ~ stays unquoted so each worker expands it; the space in the path is quoted.
    assert "tar -xzf ~/jax_hd_src.tar.gz -C ~/'code/jax hd'" in flag_value(untar, "--command")
    assert "cd ~/'code/jax hd'" in flag_value(install, "--command")


def run_remote(sandbox: Sandbox, remote: str) -> subprocess.CompletedProcess:
    """Run a --command string the way a worker would, in a fake checkout whose .venv python records its argv."""
    venv_bin = sandbox.home / "jax_hd" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "activate").write_text('PATH="$PWD/.venv/bin:$PATH"\n')
    python = venv_bin / "python"
    python.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "out = os.path.join(os.environ['HOME'], 'argv.json')\n"
        "with open(out + '.tmp', 'w') as f:\n"
        "    json.dump({'cwd': os.getcwd(), 'argv': sys.argv[1:]}, f)\n"
        "os.replace(out + '.tmp', out)\n"
        "print('fake python ran', flush=True)\n"
    )
    python.chmod(0o755)
    return subprocess.run(
        [BASH, "-c", remote],
        env=sandbox.env(),
        cwd=sandbox.home,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )


def wait_for(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_run_foreground_keeps_arguments_intact(sandbox: Sandbox) -> None:
    user_cmd = IGSEARCH + AWKWARD
    result = sandbox.run("run.sh", *user_cmd)
    assert_ok(result)
    (argv,) = result.commands
    assert argv[:6] == TPU_VM + ["ssh", "test-pod"]
    assert "--zone=europe-west4-a" in argv and "--worker=all" in argv
    remote = flag_value(argv, "--command")
    assert "nohup" not in remote
    assert remote.startswith("cd ~/jax_hd && . .venv/bin/activate && ")
    assert shlex.split(remote)[-len(user_cmd) :] == user_cmd
    assert "python -m experiments.igsearch --config=experiments/configs/igsearch.py:qwen2_5_3b_tpu" in remote

    proc = run_remote(sandbox, remote)
    assert proc.returncode == 0, proc.stderr
    assert "fake python ran" in proc.stdout
    record = json.loads((sandbox.home / "argv.json").read_text())
    assert record == {"cwd": str(sandbox.home / "jax_hd"), "argv": user_cmd[1:]}


def test_run_detached_logs_to_file(sandbox: Sandbox) -> None:
    user_cmd = IGSEARCH + AWKWARD
    result = sandbox.run("run.sh", *user_cmd, DETACH="1", TPU_LOG_DIR="~/my logs")
    assert_ok(result)
    (argv,) = result.commands
    assert argv[:6] == TPU_VM + ["ssh", "test-pod"] and "--worker=all" in argv
    remote = flag_value(argv, "--command")
    assert "nohup " in remote and "> ~/'my logs'/run.log 2>&1" in remote

    started = time.monotonic()
    proc = run_remote(sandbox, remote)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 10, "DETACH=1 must not wait for the command"
    assert "started pid" in proc.stdout
    wait_for(sandbox.home / "argv.json")
    record = json.loads((sandbox.home / "argv.json").read_text())
    assert record == {"cwd": str(sandbox.home / "jax_hd"), "argv": user_cmd[1:]}
    log = sandbox.home / "my logs" / "run.log"
    deadline = time.monotonic() + 20
    while "fake python ran" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline, "run.log never got the command's output"
        time.sleep(0.05)


def test_run_without_command_fails(sandbox: Sandbox) -> None:
    result = sandbox.run("run.sh")
    assert result.returncode != 0
    assert "no command given" in result.stderr and not result.lines


@pytest.mark.parametrize("workers", [None, "2"])
def test_copy_logs(sandbox: Sandbox, workers: str | None) -> None:
    result = sandbox.run("copy_logs.sh", TPU_NUM_WORKERS=workers)
    assert_ok(result)
    n = 4 if workers is None else int(workers)
    scps = result.gcloud("scp")
    assert len(scps) == n
    for i, argv in enumerate(scps):
        assert "--recurse" in argv and f"--worker={i}" in argv and "--zone=europe-west4-a" in argv
        positional = [a for a in argv[5:] if not a.startswith("--")]
        assert positional == ["test-pod:jax_hd_logs", f"tpu_logs/test-pod/worker-{i}/"]
    assert not result.gcloud("describe")
    assert not any(sandbox.cwd.iterdir()), "DRY_RUN=1 must not create the local log directories"


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_tpu_name_fails_clearly(sandbox: Sandbox, script: str) -> None:
    result = sandbox.run(script, "echo", TPU_NAME=None) if script == "run.sh" else sandbox.run(script, TPU_NAME=None)
    assert result.returncode != 0
    assert "TPU_NAME is not set" in result.stderr
    assert not result.lines


def test_fake_gcloud_catches_real_calls(sandbox: Sandbox) -> None:
    """Without DRY_RUN the scripts do call gcloud, so the marker checks above are not vacuous."""
    result = sandbox.run("delete.sh", dry_run=False)
    assert result.returncode == 99
    assert sandbox.marker.read_text().split() == [
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "test-pod",
        "--zone=europe-west4-a",
        "--quiet",
    ]
