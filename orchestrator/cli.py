"""The `shores` command line: errors a user can cause are one line and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shores", description="Cultural experts as soft prompts on one frozen LM."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", required=True, help="experiment YAML (e.g. configs/demo.yaml)")
        sub.add_argument(
            "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
        )
        return sub

    train = with_config("train", "train one soft-prompt expert per culture")
    train.add_argument("--local", action="store_true", help="train in this process, without Ray or MLflow")
    train.add_argument("--resume", action="store_true", help="continue an interrupted experiment")
    train.add_argument(
        "--replace",
        action="store_true",
        help="publish this run's experts alone (default: add them to the published set, replacing their "
        "cultures')",
    )

    experts = with_config(
        "experts",
        "list the registered experts; `retire CULTURE` takes its champion out of serving; "
        "`promote CULTURE VERSION` makes a version the champion if it validates better (--force: anyway)",
    )
    experts.add_argument("action", nargs="?", choices=["retire", "promote"], help="change a champion")
    experts.add_argument("target", nargs="*", metavar="CULTURE [VERSION]", help="the culture (and version)")
    experts.add_argument("--json", action="store_true", help="print JSON instead of a table")
    experts.add_argument("--force", action="store_true", help="promote: skip the champion gate (roll back)")

    publish = with_config("publish", "rebuild the published experts folder from the registry's champions")
    publish.add_argument(
        "--from-registry", action="store_true", required=True, help="each culture's champion, nothing else"
    )

    with_config("serve", "serve the router and every expert over HTTP (127.0.0.1:8000) until interrupted")

    ui = with_config("ui", "open the MLflow UI on the experiment's store, on 127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)

    register = commands.add_parser("register", help="log and register an experiment from its checkpoints")
    register.add_argument("--from", dest="source", required=True, help="the experiment's output_dir")
    register.add_argument(
        "--config",
        help="the config the experiment was started with, when its MLflow URI holds credentials "
        "(<output_dir>/config.yaml keeps none; or set MLFLOW_TRACKING_URI)",
    )

    ev = with_config(
        "eval", "score base, persona, shared, expert, committee, uniform and agnostic on survey records"
    )
    ev.add_argument(
        "--data",
        help="another survey file (.jsonl, .json or the GlobalOpinionQA .csv): the experts are scored on "
        "every record of their cultures in it (and committees on the held-out ones), unless --split is given",
    )
    ev.add_argument(
        "--split",
        choices=["test", "val", "train", "all", "transfer_val", "transfer_test"],
        help="the questions to score, split as training splits them (default: test; with --data: all); "
        "transfer_val and transfer_test need data.transfer",
    )
    ev.add_argument(
        "--experts",
        help="a directory of experts, or a registry alias such as `champion` (default: <output_dir>/experts)",
    )
    ev.add_argument("--out", required=True, help="report JSON path; a PNG chart is written beside it")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `shores` command."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = _parser().parse_args(argv)
    from orchestrator.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as err:
        print(f"shores {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"shores {args.command}: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config

    config = load_config(args.config, args.set)
    if args.local:
        from orchestrator.local_train import train_local

        train_local(config, replace=args.replace)
        return 0
    from orchestrator.driver import train

    outcome = train(config, resume=args.resume, replace=args.replace)
    if outcome.interrupted:
        return 130
    return 0 if outcome.experts and not outcome.failed else 1


def _experts(args: argparse.Namespace) -> int:
    import json

    from orchestrator.config import load_config
    from workers.expert_store import Registry, registered_experts

    config = load_config(args.config, args.set)
    if args.action:
        return _change_champion(args, config)
    rows = registered_experts(Registry.of_experiment(config.output_dir, config.mlflow))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'culture':<24}{'model':<32}{'version':>8}  {'aliases':<12}{'val alignment':>14}")
    for row in rows:
        aliases = ",".join(row["aliases"])
        print(
            f"{row['culture']:<24}{row['model']:<32}{row['version']:>8}  {aliases:<12}{row['val_alignment']:>14.4f}"
        )
    if not rows:
        print("(no registered experts yet: run `shores train --config ...`)")
    return 0


def _change_champion(args: argparse.Namespace, config) -> int:
    """`experts retire CULTURE` or `experts promote CULTURE VERSION`; then the published folder follows."""
    import getpass

    from orchestrator.config import ConfigError
    from orchestrator.registry import Champions
    from orchestrator.survey import prepare_data

    wanted = 1 if args.action == "retire" else 2
    if len(args.target) != wanted or (wanted == 2 and not args.target[1].isdigit()):
        usage = "retire CULTURE" if wanted == 1 else "promote CULTURE VERSION (a number)"
        raise ConfigError(f"usage: shores experts {usage} --config ...")
    data = prepare_data(config.data)  # read first: a bad data file changes nothing
    champions, user = Champions.from_config(config), getpass.getuser()
    culture = args.target[0]
    if args.action == "retire":
        version = champions.retire(culture, user)
        print(f"retired {champions.store.model_name(culture)} v{version}: it is no longer the champion")
    else:
        row = champions.promote(culture, int(args.target[1]), force=args.force, user=user)
        if not row.champion:
            why = row.note or "it does not validate better than the champion"
            print(
                f"shores experts: not promoted: {row.model} v{row.version}: {why} (--force: anyway)",
                file=sys.stderr,
            )
            return 1
        print(f"promoted {row.model} v{row.version} (val alignment {row.val_alignment:.4f}) to champion")
    return _publish_champions(config, data)


def _publish(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.survey import prepare_data

    config = load_config(args.config, args.set)
    return _publish_champions(config, prepare_data(config.data))


def _publish_champions(config, data) -> int:
    from orchestrator.publish import publish_champions
    from orchestrator.registry import Store

    published = publish_champions(config.experts_dir, Store.from_config(config), data)
    return 0 if published else 1


def _ui(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.registry import TrackingError
    from orchestrator.tracking import ExperimentTracker

    tracker = ExperimentTracker(load_config(args.config, args.set))
    store = tracker.store
    command = [
        "mlflow",
        "ui",
        "--backend-store-uri",
        store.tracking_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(args.port),
    ]
    if not store.tracking_uri.startswith("http"):
        command += ["--default-artifact-root", store.artifact_root]
    # A review UI runs no server-side jobs: without them MLflow idles in 0.4 GB instead of 1.8 GB.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    address = f"http://127.0.0.1:{args.port}/"
    try:
        experiment = f"; the experiment: {address}{tracker.experiment_url()}"
    except TrackingError:
        experiment = ""  # the UI itself will say what is wrong with the store
    print(f"MLflow UI on {address}{experiment} (Ctrl-C to stop)", flush=True)
    return run_child([str(Path(sys.executable).parent / command[0]), *command[1:]])


def run_child(command: list[str]) -> int:
    """Run a child process (a server) until it ends, and end it with this one: SIGTERM or SIGINT to this process
    is passed on to it, then waited for. Its own process group: a terminal's Ctrl-C reaches it once, through
    this process. Returns its exit status; 128 + the signal where a signal ended it."""
    import os
    import signal
    import subprocess

    child = subprocess.Popen(command, process_group=0)

    def pass_on(signum: int, frame: object) -> None:  # to the child's whole group: its workers too
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    forwarded = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.signal(s, pass_on) for s in forwarded}
    try:
        code = child.wait()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 128 - code if code < 0 else code


def _serve(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from serve.app import ServeStartError, run  # the one import of serve: the CLI is the edge that starts it

    try:
        return run(load_config(args.config, args.set))
    except ServeStartError as err:
        print(f"shores serve: error: {err}", file=sys.stderr)
        return 2


def _register(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.driver import register_from

    original = load_config(args.config) if args.config else None
    outcome = register_from(Path(args.source), original)
    return 0 if outcome.registered else 1


def _eval(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.eval_run import run_evaluation

    config = load_config(args.config, args.set)
    run_evaluation(config, Path(args.out), data_file=args.data, split=args.split, experts_from=args.experts)
    return 0


COMMANDS = {
    "train": _train,
    "eval": _eval,
    "experts": _experts,
    "ui": _ui,
    "register": _register,
    "publish": _publish,
    "serve": _serve,
}

if __name__ == "__main__":
    sys.exit(main())
