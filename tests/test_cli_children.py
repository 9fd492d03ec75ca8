"""Every process the CLI starts ends with it: `shores ui` stopped with SIGTERM stops its MLflow server too."""

import os
import signal
import socket
import subprocess
import time

import psutil

from tests.conftest import OPINIONS, REPO, free_ports, shores_ui_command

START_S = 180  # how long the MLflow server may take to listen, on a busy machine


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_sigterm_to_shores_ui_stops_its_mlflow_server_and_frees_the_port(tmp_path):
    (port,) = free_ports(1)
    sets = ["base_model.name=unused", f"data.path={OPINIONS}", f"output_dir={tmp_path}"]
    command = shores_ui_command(port, *[x for s in sets for x in ("--set", s)])
    log = open(tmp_path / "ui.log", "w")
    ui = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_S
        while not listening(port):
            assert time.monotonic() < deadline, f"no server on {port} in {START_S} s"
            try:  # waits on the process between tries; one that exits is a failure
                ui.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
            raise AssertionError(
                f"shores ui exited with {ui.returncode}: {(tmp_path / 'ui.log').read_text()[-2000:]}"
            )
        children = psutil.Process(ui.pid).children(recursive=True)
        assert children, "shores ui started no server process"

        os.kill(ui.pid, signal.SIGTERM)  # the process alone, not its group
        assert ui.wait(timeout=60) in (0, 128 + signal.SIGTERM)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running: {[p.pid for p in alive]}"
        assert not listening(port)
    finally:
        for process in [*children, psutil.Process(ui.pid) if ui.poll() is None else None]:
            if process is not None and process.is_running():
                process.kill()
        log.close()
