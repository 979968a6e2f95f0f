"""Multi-host start-up and launchers: env detection, node lists, dry runs, signal forwarding.

Nothing here starts JAX's distributed runtime; tests/e2e/multiprocess_test.py does.
"""

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bigtrain import distributed
from bigtrain import main as main_lib
from tests.conftest import REPO

LAUNCH = REPO / "launch"


# --- bigtrain.distributed


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),
        ("x[009-011],y,z[1]", ["x009", "x010", "x011", "y", "z1"]),
        ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
        ("a-b.c,d_e", ["a-b.c", "d_e"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[a-b]", "node[05-01]"])
def test_expand_nodelist_rejects_what_it_cannot_read(bad):
    with pytest.raises(distributed.DistributedError):
        distributed.expand_nodelist(bad)


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "node[07-08],gpu5",
}


def _kwargs(env, **flags):
    return distributed.resolve(env=env, **flags).kwargs


def test_no_flags_no_cluster_is_one_process():
    plan = distributed.resolve(env={"PATH": "/bin"})
    assert plan.kwargs is None and plan.source == "single"
    assert "single process" in plan.describe()


def test_explicit_flags():
    assert _kwargs({}, coordinator="10.0.0.1:1234", num_processes=2, process_id=1) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2,
        "process_id": 1,
        "cluster_detection_method": "deactivate",
    }


def test_slurm_first_host_default_port_procid_ntasks():
    plan = distributed.resolve(env=SLURM)
    assert plan.source == "slurm"
    assert plan.kwargs == {
        "coordinator_address": "node07:12355",
        "num_processes": 4,
        "process_id": 2,
        "cluster_detection_method": "deactivate",  # JAX would pin one GPU per task otherwise
    }
    assert plan.describe() == "slurm: process 2 of 4, coordinator node07:12355"


def test_slurm_port_override_and_step_nodelist():
    env = {**SLURM, "BIGTRAIN_COORDINATOR_PORT": "23456", "SLURM_STEP_NODELIST": "gpu[12-13]"}
    assert _kwargs(env)["coordinator_address"] == "gpu12:23456"


def test_explicit_flags_win_over_slurm():
    kwargs = _kwargs(SLURM, coordinator="head:999", process_id=0)
    assert kwargs["coordinator_address"] == "head:999"
    assert kwargs["process_id"] == 0
    assert kwargs["num_processes"] == 4  # the flag not given still comes from SLURM


def test_slurm_single_task_is_one_process():
    assert _kwargs({**SLURM, "SLURM_NTASKS": "1"}) is None
    assert _kwargs({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}) is None


def test_slurm_without_procid_says_use_srun():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}
    with pytest.raises(distributed.DistributedError, match="srun"):
        distributed.resolve(env=env)


@pytest.mark.parametrize(
    "env",
    [
        {"TPU_WORKER_HOSTNAMES": "t1k-0,t1k-1"},
        {"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2:8080"},
        {"CLOUD_TPU_TASK_ID": "1"},
        {"BIGTRAIN_DISTRIBUTED": "jax"},
    ],
)
def test_cloud_tpu_lets_jax_detect(env):
    plan = distributed.resolve(env=env)
    assert plan.source == "tpu" and plan.kwargs == {}  # jax.distributed.initialize()
    assert "Cloud TPU" in plan.describe()


def test_tpu_takes_explicit_flags_and_detects_the_rest():
    assert _kwargs({"CLOUD_TPU_TASK_ID": "0"}, process_id=0) == {"process_id": 0}


def test_bigtrain_distributed_none_wins_over_the_environment():
    assert _kwargs({**SLURM, "BIGTRAIN_DISTRIBUTED": "none"}) is None
    with pytest.raises(distributed.DistributedError, match="none"):
        distributed.resolve(env={"BIGTRAIN_DISTRIBUTED": "none"}, num_processes=2)
    with pytest.raises(distributed.DistributedError, match="auto, jax, none"):
        distributed.resolve(env={"BIGTRAIN_DISTRIBUTED": "yes"})


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"num_processes": 2}, "--coordinator, --process_id"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, r"\[0, 2\)"),
        ({"coordinator": "h", "num_processes": 2, "process_id": 0}, "host:port"),
    ],
)
def test_incomplete_or_wrong_flags_are_named(flags, message):
    with pytest.raises(distributed.DistributedError, match=message):
        distributed.resolve(env={}, **flags)


def test_initialize_passes_the_plan_to_jax(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TPU_", "MEGASCALE_", "CLOUD_TPU_", "BIGTRAIN_")):
            monkeypatch.delenv(key)
    assert "single process" in distributed.initialize()
    assert calls == []
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    where = distributed.initialize()
    assert calls == [_kwargs(SLURM)]
    assert where.startswith("slurm: process 2 of 4, coordinator node07:12355; jax sees process")


def test_main_reports_bad_distributed_flags_with_status_2(capsys):
    cfg = str(REPO / "configs" / "mnist1d.py")
    code = main_lib.main(["--config", cfg, "--workdir", "unused", "--num_processes", "2"])
    assert code == 2
    assert "distributed error: multi-process run needs --coordinator" in capsys.readouterr().err


# --- launch/local.py


def _local(*args, env=None):
    return subprocess.run(
        [sys.executable, str(LAUNCH / "local.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=60,
    )


def test_local_dry_run_prints_each_process_command():
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"}
    proc = _local(
        "-n",
        "2",
        "--devices-per-process",
        "3",
        "--port",
        "4321",
        "--dry-run",
        "--",
        "--config",
        "configs/mnist1d.py",
        "--workdir",
        "runs/mp",
        "--config.seed=1",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    xla = "'--xla_cpu_foo=1 --xla_force_host_platform_device_count=3'"
    cli = "-m bigtrain.main --config configs/mnist1d.py --workdir runs/mp --config.seed=1"
    assert proc.stdout.splitlines() == [
        f"JAX_PLATFORMS=cpu XLA_FLAGS={xla} {shlex.quote(sys.executable)} {cli} "
        f"--coordinator 127.0.0.1:4321 --num_processes 2 --process_id {i}"
        for i in range(2)
    ]


def test_local_usage_errors():
    assert _local("-n", "2").returncode == 2  # no bigtrain arguments
    assert _local("--", "--config", "x").returncode == 2  # no -n


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return [sys.executable, "-u", str(path)]


def _launch_driver(cmds):
    """A launcher process running `cmds` (not bigtrain) through launch/local.py's launch()."""
    code = (
        f"import sys; sys.path.insert(0, {str(LAUNCH)!r}); import local; "
        f"sys.exit(local.launch({cmds!r}, local.child_env(1)))"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_local_prefixes_output_and_propagates_a_failure(tmp_path):
    ok = _script(tmp_path, "ok.py", "print('hello'); print('world')")
    sleeper = _script(tmp_path, "sleep.py", "import time; print('up', flush=True); time.sleep(60)")
    fail = _script(tmp_path, "fail.py", "import sys, time; time.sleep(1); sys.exit(3)")
    proc = _launch_driver([ok, ok])
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert sorted(line for line in out.splitlines() if not line.startswith("[launcher]")) == [
        "[0] hello",
        "[0] world",
        "[1] hello",
        "[1] world",
    ]
    t = time.monotonic()
    proc = _launch_driver([sleeper, fail])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3 and time.monotonic() - t < 20  # the sleeper was killed
    assert "[0] up" in out
    assert "process 1 exited with status 3" in err


def test_local_forwards_sigterm_to_every_process(tmp_path):
    child = _script(
        tmp_path,
        "child.py",
        """
        import signal, sys, time
        def stop(signum, frame):
            print("saving after", signal.Signals(signum).name, flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(60)
        sys.exit(1)
        """,
    )
    proc = _launch_driver([child, child])
    ready = 0
    while ready < 2:
        line = proc.stdout.readline()
        assert line, "launcher ended early"
        ready += line.endswith("ready\n")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "[0] saving after SIGTERM" in out and "[1] saving after SIGTERM" in out


# --- launch/tpu_vm.sh


def _clean_env(**extra):
    """This process's environment without any cluster variables (CI may itself run under SLURM)."""
    prefixes = ("SLURM_", "TPU_", "MEGASCALE_", "CLOUD_TPU_", "BIGTRAIN_", "DRY_RUN")
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **extra}


def _bash(script, *args, env=None):
    return subprocess.run(
        ["bash", str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=_clean_env(**(env or {})),
        timeout=60,
    )


TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
WHERE = ["--zone=us-east5-a", "--project=my-proj"]


def test_tpu_vm_create_logs_delete_dry_run():
    common = ["--name", "demo", "--zone", "us-east5-a", "--project", "my-proj", "--dry-run"]
    proc = _bash("tpu_vm.sh", "create", *common, "--accelerator", "v5p-16")
    assert proc.returncode == 0, proc.stderr
    create = [*TPU, "create", "demo", *WHERE, "--accelerator-type=v5p-16"]
    assert proc.stdout == shlex.join([*create, "--version=tpu-ubuntu2204-base"]) + "\n"
    proc = _bash("tpu_vm.sh", "logs", *common)
    tail = "--command=tail -n 200 -F ~/bigtrain.log"
    assert proc.stdout == shlex.join([*TPU, "ssh", "demo", "--worker=0", *WHERE, tail]) + "\n"
    proc = _bash("tpu_vm.sh", "delete", "--name", "demo", "--zone", "us-east5-a", "--dry-run")
    assert (
        proc.stdout == shlex.join([*TPU, "delete", "demo", "--zone=us-east5-a", "--quiet"]) + "\n"
    )


def test_tpu_vm_run_dry_run_packs_copies_installs_and_starts_on_all_workers():
    args = ["--config", "configs/mnist1d.py", "--workdir", "/mnt/runs/m", "--config.data.pp=a|b"]
    proc = _bash(
        "tpu_vm.sh",
        "run",
        "--name",
        "demo",
        "--zone",
        "us-east5-a",
        "--project",
        "my-proj",
        "--dry-run",
        "--",
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    pack, scp, ssh = proc.stdout.splitlines()
    repo, tarball = shlex.quote(str(REPO)), "/tmp/bigtrain-demo.tar.gz"
    assert pack == (
        f"git -C {repo} ls-files -z --cached --others --exclude-standard "
        f"| tar -czf {tarball} -C {repo} --null -T -"
    )
    assert scp == shlex.join([*TPU, "scp", tarball, "demo:bigtrain.tar.gz", "--worker=all", *WHERE])
    argv = shlex.split(ssh)
    assert argv[:-1] == [*TPU, "ssh", "demo", "--worker=all", *WHERE]
    remote = argv[-1].removeprefix("--command=")
    assert "'jax[tpu]==0.10.2'" in remote  # the pinned version, read from pyproject.toml
    assert (
        "BIGTRAIN_DISTRIBUTED=jax nohup ~/venv/bin/python -m bigtrain.main "
        "--config configs/mnist1d.py --workdir /mnt/runs/m '--config.data.pp=a|b' "
        "> ~/bigtrain.log 2>&1 < /dev/null & echo $! > ~/bigtrain.pid"
    ) in remote
    assert subprocess.run(["bash", "-n", "-c", remote]).returncode == 0  # valid shell


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["start", "--name", "a", "--zone", "b"],
        ["create", "--zone", "b"],
        ["run", "--name", "a", "--zone", "b"],  # no bigtrain arguments
        ["create", "--name", "a", "--zone", "b", "--bogus"],
    ],
)
def test_tpu_vm_usage_errors(args):
    proc = _bash("tpu_vm.sh", *args)
    assert proc.returncode == 2 and "usage: launch/tpu_vm.sh" in proc.stderr
    assert proc.stdout == ""


# --- launch/slurm.sbatch


def test_slurm_header_asks_for_signal_before_the_limit_and_requeue():
    header = [
        line for line in (LAUNCH / "slurm.sbatch").read_text().splitlines() if line[:7] == "#SBATCH"
    ]
    for option in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--time="):
        assert any(option in line for line in header), option
    assert "#SBATCH --signal=B:TERM@120" in header and "#SBATCH --requeue" in header


@pytest.mark.parametrize("how", ["flag", "env"])
def test_slurm_dry_run_prints_srun_and_the_resolved_environment(how):
    env = {**SLURM, "SLURM_PROCID": "0", "PYTHON": sys.executable}
    args = ["configs/mnist1d.py", "/shared/runs/m", "--config.total_steps=500"]
    if how == "flag":
        proc = _bash("slurm.sbatch", "--dry-run", *args, env=env)
    else:
        proc = _bash("slurm.sbatch", *args, env={**env, "DRY_RUN": "1"})
    assert proc.returncode == 0, proc.stderr
    srun = ["srun", "--kill-on-bad-exit=1", "--unbuffered", sys.executable, "-m", "bigtrain.main"]
    assert proc.stdout.splitlines() == [
        f"cd {shlex.quote(str(REPO))}",
        "BIGTRAIN_COORDINATOR_PORT=12355",
        "SLURM_JOB_ID=4242",
        "SLURM_JOB_NODELIST='node[07-08],gpu5'",
        "SLURM_NTASKS=4",
        shlex.join([*srun, "--config", args[0], "--workdir", args[1], args[2]]),
        "bigtrain.distributed (task 0): slurm: process 0 of 4, coordinator node07:12355",
    ]


def test_slurm_dry_run_outside_slurm_and_usage():
    proc = _bash("slurm.sbatch", "--dry-run", "c.py", "w", env={"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    assert "SLURM_NTASKS=(unset)" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("single process (no jax.distributed.initialize)")
    proc = _bash("slurm.sbatch", "--dry-run", "only-config.py")
    assert proc.returncode == 2 and "usage: sbatch launch/slurm.sbatch" in proc.stderr


def test_slurm_forwards_sigterm_to_srun_then_requeues(tmp_path):
    """With a fake srun/scontrol: the batch shell's SIGTERM reaches the task, then a requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n'
    )
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/scontrol\n')
    task = tmp_path / "task"
    task.write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        trap 'echo saved > {tmp_path}/saved; exit 0' TERM
        echo ready > {tmp_path}/ready
        for i in $(seq 600); do sleep 0.1; done
        exit 1
        """)
    )
    for path in (bin_dir / "srun", bin_dir / "scontrol", task):
        path.chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(task), SLURM_JOB_ID="99")
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "c.py", "w"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (tmp_path / "saved").read_text() == "saved\n"
    assert (tmp_path / "scontrol").read_text() == "requeue 99\n"
