"""A `dagster dev` server of the demo code location for end-to-end tests, driven by GraphQL.

:func:`dagster_dev_server` starts the webserver, daemon and code server as one process group
(killed at the end: `dagster dev` ignores SIGTERM from a parent that is not a terminal, so the
group is signalled) on a fresh instance whose storage is created first, with runs on the tiny
random Qwen3 checkpoint on CPU. :class:`DagsterDev` sends the GraphQL the UI sends (launch a
run or a backfill, poll a status, read a run's events).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

REPO = Path(__file__).resolve().parents[1]
# How often the tests poll the server and the instance.
POLL_SECONDS = 0.5
# Dequeue queued runs every second (default 5 s) so the tests wait less. The asset daemon keeps
# its 30 s cadence (its interval would otherwise follow the backfill daemon's, see below).
INSTANCE_YAML = """
telemetry:
  enabled: false
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1
auto_materialize:
  minimum_interval_seconds: 30
"""
# The backfill daemon ticks every 30 s (dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS,
# no setting): it starts a requested backfill's runs and marks the backfill complete on a tick,
# so a test would wait up to 30 s twice. This sitecustomize, on the PYTHONPATH of the
# `dagster dev` processes only, sets that constant to BACKFILL_TICK_SECONDS when dagster imports
# it (nothing else changes; if dagster moves the constant, the daemon just keeps 30 s).
BACKFILL_TICK_SECONDS = 5
SITECUSTOMIZE = f"""
import importlib.abc
import importlib.util
import sys

_MODULE = "dagster._daemon.controller"


class _ShortDaemonInterval(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if hasattr(module, "DEFAULT_DAEMON_INTERVAL_SECONDS"):
                module.DEFAULT_DAEMON_INTERVAL_SECONDS = {BACKFILL_TICK_SECONDS}

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _ShortDaemonInterval())
"""

LAUNCH_BACKFILL = """
mutation ($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on Error { message }
  }
}
"""
BACKFILL_STATUS = """
query ($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status }
    ... on Error { message }
  }
}
"""
LAUNCH_RUN = """
mutation ($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on Error { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
RUN_STATUS = """
query ($id: ID!) {
  runOrError(runId: $id) { __typename ... on Run { status } ... on Error { message } }
}
"""
# What the run page shows: step failures (the error message), check results, materializations.
RUN_EVENTS = """
query ($id: ID!) {
  logsForRun(runId: $id, limit: 5000) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on ExecutionStepFailureEvent { stepKey error { message } }
        ... on AssetCheckEvaluationEvent {
          evaluation {
            checkName success description
            metadataEntries { label ... on FloatMetadataEntry { floatValue } }
          }
        }
        ... on MaterializationEvent {
          partition
          metadataEntries {
            label
            ... on IntMetadataEntry { intValue }
            ... on TextMetadataEntry { text }
            ... on BoolMetadataEntry { boolValue }
          }
        }
      }
    }
    ... on Error { message }
  }
}
"""
AUTOMATION_STATUS = """
query ($selector: RepositorySelector!) {
  schedulesOrError(repositorySelector: $selector) {
    __typename ... on Schedules { results { name scheduleState { status } } }
  }
  sensorsOrError(repositorySelector: $selector) {
    __typename ... on Sensors { results { name sensorState { status } } }
  }
}
"""
REPOSITORIES = """
{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } } }
  ... on Error { message } } }
"""
FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DagsterDev:
    """A running `dagster dev`: its GraphQL endpoint, process group and log."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}/graphql"
        self.process = process
        self.log = log
        self.location = ""
        self.repository = ""

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            self.url, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = json.loads(response.read())
        assert "errors" not in payload, payload
        return payload["data"]

    def wait_until_loaded(self, timeout: float) -> tuple[str, str]:
        """Wait for the code location; returns (and keeps) its location and repository names."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-5000:]
            try:
                nodes = self.graphql(REPOSITORIES)["repositoriesOrError"].get("nodes")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                nodes = None
            if nodes:
                self.location, self.repository = nodes[0]["location"]["name"], nodes[0]["name"]
                return self.location, self.repository
            time.sleep(POLL_SECONDS)
        raise AssertionError(f"dagster dev did not load in {timeout}s:\n{self.log.read_text()}")

    def wait_for(
        self,
        what: str,
        query: str,
        variables: dict,
        pick: Callable[[dict], Any],
        done: set,
        timeout: float,
    ) -> Any:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = pick(self.graphql(query, variables))
            if status in done:
                return status
            time.sleep(POLL_SECONDS)
        raise AssertionError(f"{what} still {status} after {timeout}s:\n{self.log.read_text()}")

    def launch_run(
        self,
        job: str,
        *,
        config: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        assets: list[str] | None = None,
    ) -> str:
        """Launch a run as the launchpad does (``launchRun``); returns its id.

        ``assets`` selects assets of the job (the UI's *Materialize* sends ``__ASSET_JOB``
        with the selected asset keys).
        """
        selector: dict[str, Any] = {
            "repositoryLocationName": self.location,
            "repositoryName": self.repository,
            "jobName": job,
        }
        if assets is not None:
            selector["assetSelection"] = [{"path": [key]} for key in assets]
        params: dict[str, Any] = {
            "selector": selector,
            "runConfigData": dict(config or {}),
            "executionMetadata": {
                "tags": [{"key": k, "value": v} for k, v in (tags or {}).items()]
            },
        }
        launched = self.graphql(LAUNCH_RUN, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        return str(launched["run"]["runId"])

    def wait_for_run(self, run_id: str, timeout: float = 300) -> str:
        """The run's final status (``SUCCESS``, ``FAILURE`` or ``CANCELED``)."""
        return str(
            self.wait_for(
                f"run {run_id}",
                RUN_STATUS,
                {"id": run_id},
                lambda d: d["runOrError"]["status"],
                FINISHED,
                timeout=timeout,
            )
        )

    def run_events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's step failures, check evaluations and materializations, as the UI reads them."""
        logs = self.graphql(RUN_EVENTS, {"id": run_id})["logsForRun"]
        assert logs["__typename"] == "EventConnection", logs
        return [e for e in logs["events"] if len(e) > 1]

    def step_failure(self, run_id: str) -> str:
        """The error message of the run's one failed step (what the run page shows)."""
        (failure,) = [
            e for e in self.run_events(run_id) if e["__typename"] == "ExecutionStepFailureEvent"
        ]
        return str(failure["error"]["message"])


@contextmanager
def dagster_dev_server(
    tmp_path: Path, model_dir: Path, env: Mapping[str, str] | None = None
) -> Iterator[tuple[DagsterDev, dict[str, str]]]:
    """Start `dagster dev` on the demo code location; stop its process group on exit.

    Args:
        tmp_path: Holds the instance (``dagster_home``), the data directory and the log.
        model_dir: The checkpoint the runs load (``QWEN3_PIPELINE_MODEL``).
        env: More environment variables of the server.

    Yields:
        The server (starting; call :meth:`DagsterDev.wait_until_loaded`) and its environment.
    """
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    # `dagster dev` starts the webserver and the daemon at once, and each creates a fresh
    # instance's SQLite tables: racing, one can fail with "table secondary_indexes already
    # exists" (seen in CI). Create the storage first, as `make dev` does (prepare_instance).
    with dg.DagsterInstance.from_config(str(home)):
        pass
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    server_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "DAGSTER_HOME": str(home),
        "QWEN3_PIPELINE_DATA_DIR": str(tmp_path / "data"),
        "QWEN3_PIPELINE_MODEL": str(model_dir),
        "HF_HUB_OFFLINE": "1",
        # A progress line per forward pass (the demo corpus takes seconds, not minutes).
        "QWEN3_PIPELINE_PROGRESS_SECONDS": "0.000001",
        **(env or {}),
    }
    port = free_port()
    log = tmp_path / "dagster_dev.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("dagster")),
                "dev",
                "-w",
                "workspace.yaml",
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            cwd=REPO,
            env=server_env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            # Its own process group: `dagster dev` ignores SIGTERM from a non-terminal parent,
            # so the whole group is signalled at the end.
            start_new_session=True,
        )
    try:
        yield DagsterDev(port, process, log), server_env
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL after 15 s)."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
