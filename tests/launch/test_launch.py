"""launch/ scripts: `bash -n` on each, and DRY_RUN=1 runs whose printed commands are parsed back
into argv lists; the `sentijax.main` flags in them are parsed by the real config loader."""
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from sentijax import distributed

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])


def _dry_run(script: Path, env: dict, args=(), cwd=REPO) -> tuple[int, str, list[list[str]]]:
  """(return code, stdout, [argv of each printed '+ ' command]) of `DRY_RUN=1 bash script`."""
  base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1"}
  proc = subprocess.run(["bash", str(script), *args], cwd=cwd, env=base | env,
                        capture_output=True, text=True, timeout=60)
  commands = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
  return proc.returncode, proc.stdout + proc.stderr, commands


def _main_config(argv: list[str]):
  """The config `python -m sentijax.main <argv>` would run with (flags parsed, nothing run)."""
  argv = ["sentijax.main", *argv]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


def _after_main(argv: list[str]) -> list[str]:
  i = argv.index("sentijax.main")
  assert argv[i - 1] == "-m" and argv[i - 2] in ("python", "python3"), argv
  return argv[i + 1:]


def test_every_launch_script_is_valid_bash():
  assert [p.name for p in SCRIPTS] == ["gpu_slurm.sbatch", "tpu_pod.sh"]
  for script in SCRIPTS:
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, f"{script}: {proc.stderr}"


def test_tpu_pod_dry_run_prints_one_gcloud_ssh_to_all_workers(monkeypatch):
  monkeypatch.chdir(REPO)
  env = {"TPU_NAME": "my-v5p-64", "ZONE": "us-east5-a", "PROJECT": "proj",
         "REPO_URL": "https://example.com/sentijax.git", "WORKDIR": "/mnt/shared/runs/kd 1b",
         "INIT_TIMEOUT": "1800", "LIBTPU_INIT_ARGS": "--xla_enable_async_all_gather=true"}
  code, out, commands = _dry_run(LAUNCH / "tpu_pod.sh", env,
                                 ["--config.train.steps=7", "--config.data.corpus=/d/it's a.jsonl"])
  assert code == 0, out
  assert len(commands) == 1, out
  argv = commands[0]
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-64"]
  assert {"--zone=us-east5-a", "--project=proj", "--worker=all"} <= set(argv)
  (remote,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  syntax = subprocess.run(["bash", "-n", "-c", remote], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr  # what every worker's shell will run
  steps = remote.split("; ")
  assert "git clone https://example.com/sentijax.git ~/sentijax" in remote
  assert "python3 -m pip install --quiet -e '.[tpu]'" in steps
  assert shlex.split(next(s for s in steps if s.startswith("export LIBTPU_INIT_ARGS="))) == [
      "export", "LIBTPU_INIT_ARGS=--xla_enable_async_all_gather=true"]
  job = next(s for s in steps if s.startswith("python3 -m sentijax.main"))
  job_argv = shlex.split(job.split(" 2>&1 | tee ")[0])
  cfg = _main_config(_after_main(job_argv))
  assert cfg.distributed.enabled and cfg.distributed.initialization_timeout == 1800
  assert cfg.workdir == "/mnt/shared/runs/kd 1b" and cfg.data.cache_dir == "/tmp/sentijax_data"
  assert cfg.train.steps == 7 and cfg.data.corpus == "/d/it's a.jsonl"  # quoting survived
  assert distributed.DistributedSpec.from_config(cfg.distributed).initialize_kwargs() == {
      "initialization_timeout": 1800}  # coordinator, count and ids: from the TPU metadata


def test_tpu_pod_refuses_to_run_without_a_slice():
  code, out, commands = _dry_run(LAUNCH / "tpu_pod.sh", {"ZONE": "us-east5-a"})
  assert code == 2 and "TPU_NAME and ZONE must be set" in out and not commands


def test_slurm_script_outside_a_job_submits_itself(tmp_path):
  env = {"NODES": "4", "TIME": "12:00:00", "PARTITION": "gpu"}
  code, out, commands = _dry_run(LAUNCH / "gpu_slurm.sbatch", env,
                                 ["--config.mesh.data=4", "--config.workdir=/shared/a b"])
  assert code == 0, out
  assert commands == [["sbatch", "--export=ALL", "--nodes=4", "--time=12:00:00",
                       "--partition=gpu", str(LAUNCH / "gpu_slurm.sbatch"),
                       "--config.mesh.data=4", "--config.workdir=/shared/a b"]]


def _slurm_job_env(tmp_path) -> dict:
  return {"SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(REPO), "SLURM_GPUS_ON_NODE": "8",
          "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[01-04]", "USER": "me"}


def test_slurm_script_in_a_job_runs_one_task_per_node_on_all_its_gpus(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  code, out, commands = _dry_run(LAUNCH / "gpu_slurm.sbatch", _slurm_job_env(tmp_path),
                                 ["--config.mesh.data=4", "--config.mesh.fsdp=8"], cwd=tmp_path)
  assert code == 0, out
  assert len(commands) == 1, out
  argv = commands[0]
  assert argv[:4] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpu-bind=none"]
  cfg = _main_config(_after_main(argv))
  spec = distributed.DistributedSpec.from_config(cfg.distributed)
  assert spec.enabled and spec.local_device_ids == tuple(range(8))
  assert spec.initialization_timeout == 900
  assert cfg.workdir == "runs/knowdist-4242" and cfg.data.cache_dir == "/tmp/sentijax_data_me"
  assert (cfg.mesh.data, cfg.mesh.fsdp) == (4, 8)
  assert "4 nodes x 8 GPUs" in out


def test_slurm_xla_flags_are_known_to_xla(tmp_path):
  """XLA aborts at start-up on an unknown XLA_FLAGS entry: start JAX (CPU) with the script's."""
  _, out, _ = _dry_run(LAUNCH / "gpu_slurm.sbatch", _slurm_job_env(tmp_path), cwd=tmp_path)
  (xla_flags,) = [line[len("# XLA_FLAGS="):] for line in out.splitlines()
                  if line.startswith("# XLA_FLAGS=")]
  names = [f.split("=")[0] for f in xla_flags.split()]
  assert "--xla_gpu_enable_latency_hiding_scheduler" in names and len(names) >= 5

  def start_jax(flags_value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=flags_value, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True, text=True, timeout=120)

  proc = start_jax(xla_flags)
  assert proc.returncode == 0, proc.stderr[-2000:]
  bogus = start_jax(xla_flags + " --xla_gpu_enable_latency_hiding_schedulr=true")
  assert bogus.returncode != 0 and "latency_hiding_schedulr" in bogus.stderr  # the check can fail


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_lists_dry_run(script):
  if script.suffix == ".sbatch":  # no --help: outside a job any arguments go to sbatch
    text = script.read_text()
  else:
    text = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True).stdout
  assert "DRY_RUN=1" in text
