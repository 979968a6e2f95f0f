"""N bigtrain processes on this machine, talking over loopback (CPU collectives via gloo).

    python launch/local.py -n 2 [--devices-per-process D] [--port P] [--dry-run] \\
        -- --config configs/mnist1d.py --workdir runs/mp

Each child runs `python -m bigtrain.main ARGS --coordinator 127.0.0.1:PORT --num_processes N
--process_id i` with JAX_PLATFORMS=cpu and D simulated CPU devices; its output lines are prefixed
with `[i]`. If a child fails, the others are killed (a peer that lost its partner would otherwise
hang in a collective) and the launcher exits with the failed child's status. SIGTERM/SIGINT to the
launcher are forwarded to every child, so each saves its part of the checkpoint and exits 0; a
third signal kills them (a process stuck in a collective cannot run its handler). If the launcher
itself is killed (SIGKILL), Linux kills the children with it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The inherited environment with JAX on CPU and exactly `devices` devices per process."""
    env = dict(os.environ if base is None else base)
    xla = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{xla.strip()} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)  # would override the XLA flag
    return env


def commands(n: int, port: int, args: list[str], python: str = sys.executable) -> list[list[str]]:
    return [
        [python, "-m", "bigtrain.main", *args]
        + ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(n), "--process_id", str(i)]
        for i in range(n)
    ]


def describe(cmd: list[str], env: dict[str, str]) -> str:
    """The command as one shell line, with the variables the launcher sets."""
    assigned = [f"{k}={shlex.quote(env[k])}" for k in ("JAX_PLATFORMS", "XLA_FLAGS")]
    return " ".join([*assigned, shlex.join(cmd)])


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: children outlive a SIGKILLed launcher


def _pump(i: int, stream, out, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        with lock:
            out.write(f"[{i}] {line}\n")
            out.flush()
    stream.close()


def launch(cmds: list[list[str]], env: dict[str, str], out=sys.stdout) -> int:
    """Runs the children to completion; the first failing child's status, else 0."""
    procs: list[subprocess.Popen] = []
    for cmd in cmds:
        procs.append(
            subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C reaches them once, through us
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        )
    lock = threading.Lock()
    for i, p in enumerate(procs):
        out.write(f"[launcher] process {i}: pid {p.pid}\n")
    out.flush()
    pumps = [
        threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
        for i, p in enumerate(procs)
    ]
    for t in pumps:
        t.start()

    received = []

    def forward(signum, _frame):
        received.append(signum)
        kill = len(received) >= 3  # the first two go through (a second Ctrl-C skips the save)
        with lock:
            what = "killing the processes" if kill else "forwarding to the processes"
            out.write(f"[launcher] {signal.Signals(signum).name}: {what}\n")
            out.flush()
        for p in procs:
            if p.poll() is not None:
                continue
            if kill:
                p.kill()
            else:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every one of them
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed:
                status = failed[0].returncode
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                break
            time.sleep(0.1)
        for p in procs:
            p.wait()
        if not status:
            status = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for t in pumps:
            t.join(timeout=5)
    if status:
        who = next(i for i, p in enumerate(procs) if p.returncode == status)
        print(f"[launcher] process {who} exited with status {status}", file=sys.stderr)
    return 128 - status if status < 0 else status  # killed by signal N -> 128+N, like a shell


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    ours, rest = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="launch/local.py",
        usage="%(prog)s -n N [--devices-per-process D] [--port P] [--dry-run] -- BIGTRAIN_ARGS",
        description="Runs N bigtrain processes on this machine over loopback.",
    )
    parser.add_argument("-n", "--num_processes", type=int, required=True)
    parser.add_argument("--devices-per-process", type=int, default=1)
    parser.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(ours)
    if args.num_processes < 1 or args.devices_per_process < 1:
        parser.error("-n and --devices-per-process must be at least 1")
    if not rest:
        parser.error("give bigtrain's arguments after --, e.g. -- --config C --workdir W")
    env = child_env(args.devices_per_process)
    cmds = commands(args.num_processes, args.port or free_port(), rest)
    if args.dry_run:
        for cmd in cmds:
            print(describe(cmd, env))
        return 0
    return launch(cmds, env)


if __name__ == "__main__":
    sys.exit(main())
