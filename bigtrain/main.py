"""CLI: python -m bigtrain.main --config configs/x.py[:arg] --workdir DIR [--config.key=value ...]

User errors (bad config, bad flags) print one message and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

USAGE = "python -m bigtrain.main --config configs/x.py[:arg] --workdir DIR [--config.KEY=VALUE ...]"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="bigtrain.main", usage=USAGE)
    parser.add_argument("--config", required=True, help="config file, optionally with :variant")
    parser.add_argument("--workdir", help="checkpoints and logs; resumes if present")
    parser.add_argument(
        "--compile_only",
        action="store_true",
        help="compile the step for the configured mesh, print memory and FLOPs, do not train",
    )
    parser.add_argument(
        "--coordinator", help="multi-host: coordinator host:port (else SLURM/TPU env, else one)"
    )
    parser.add_argument("--num_processes", type=int, help="multi-host: number of processes")
    parser.add_argument("--process_id", type=int, help="multi-host: this process's index")
    args, rest = parser.parse_known_args(argv)
    if not args.workdir and not args.compile_only:
        parser.error("--workdir is required (checkpoints and logs go there)")
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            parser.error(
                f"unrecognized argument {item!r}; config overrides look like "
                "--config.total_steps=500"
            )
        key, eq, value = item[len("--config.") :].partition("=")
        if not eq:
            parser.error(f"{item!r} has no value; write {item}=VALUE")
        overrides.append(f"{key}={value}")
    return args, overrides


def _one_line(record: logging.LogRecord) -> bool:
    """Drops library tracebacks from the log: the error they describe is reported once, by us."""
    record.exc_info, record.exc_text = None, None
    return True


def _thread_error(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread else "?"
    print(f"error in thread {name}: {args.exc_type.__name__}: {args.exc_value}", file=sys.stderr)


def _unraisable(args) -> None:
    print(
        f"ignored in a library callback: {args.exc_type.__name__}: {args.exc_value}",
        file=sys.stderr,
    )


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "grain", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger(noisy).addFilter(_one_line)  # we report their errors ourselves

    from bigtrain import checkpoint
    from bigtrain import config as config_lib

    try:
        config = config_lib.load(args.config, overrides)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from bigtrain import distributed

    try:
        where = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    except distributed.DistributedError as e:
        print(f"distributed error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("bigtrain").info("%s", where)

    from bigtrain import resilience, train
    from bigtrain.data import DataError

    if args.compile_only:
        try:
            stats = train.compile_only(config)
        except config_lib.ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        except DataError as e:
            print(f"data error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(stats, indent=2))
        return 0
    try:
        metrics = train.run(config, args.workdir)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # unreadable data or a strict stop: names the file and the fix
        print(f"data error: {e}", file=sys.stderr)
        return 2
    except checkpoint.CheckpointError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        return 3
    except checkpoint.CheckpointSaveError as e:
        print(f"checkpoint error: {e}", file=sys.stderr)
        _exit_now(3)  # Orbax's failed background writers would print tracebacks at shutdown
    except resilience.NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 4
    if metrics.get("preempted"):
        print("preempted: checkpoint saved; run the same command again to resume")
        return 0
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if "/" in k)
    print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
