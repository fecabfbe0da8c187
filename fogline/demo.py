"""``fogline demo``: the whole system on one machine, with a real model.

Broker → control plane → 3 agents (separate processes) → train edge and cloud
models → int8 compression with an accuracy gate → signed packages → cloud
fallback → MQTT rollout → every held-out digit sent to the agents → report.
``--model minilm`` does the same with the pre-trained MiniLM sentence
embedder and text requests (``fogline.minilm_demo``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import FoglineError
from fogline.processes import ManagedProcess, ProcessError
from fogline.report import render_table
from fogline.traffic import Target, run_phase

if TYPE_CHECKING:
    from fogline.broker import BrokerKind

logger = logging.getLogger(__name__)

# With --keep-running the demo lives as long as these do; any other child (an agent,
# the fallback) that dies is reported and started again, at most MAX_RESTARTS times.
CORE_PROCESSES = ("control",)  # and the broker, which is not a ManagedProcess
MAX_RESTARTS = 3
MODEL = "digits"
MODELS = ("digits", "minilm")
VERSION = "1"  # the demo publishes one version of each variant ...
NEXT_VERSION = "2"  # ... and the digits edge model again after the hard-example turn


@dataclass(frozen=True)
class DemoOptions:
    workdir: Path
    agents: int = 3
    broker: BrokerKind = "auto"
    samples: int | None = None  # None: every held-out digit
    json: bool = False
    keep_running: bool = False
    seed: int = 0
    model: str = MODEL
    hard_example_turn: bool = True  # digits only
    model_cache: Path | None = None  # digits: trained models kept and reused here


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON object on stdout (logs on stderr)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="leave everything up after the report until Ctrl-C",
    )
    parser.add_argument("--agents", type=int, default=3, help="edge agents (default: 3)")
    parser.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="auto: mosquitto if on PATH, else the embedded amqtt broker",
    )
    parser.add_argument("--samples", type=int, help="send only this many held-out digits")
    parser.add_argument(
        "--workdir", type=Path, help="keep state here (default: a temp dir, removed at exit)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-hard-example-turn",
        dest="hard_example_turn",
        action="store_false",
        help="digits: stop after the first traffic instead of retraining the edge model on "
        "the hard examples the agents uploaded, rolling it out in stages and sending the "
        "same traffic again (the turn adds about 10-20 s)",
    )
    parser.add_argument(
        "--model-cache",
        type=Path,
        default=os.environ.get("FOGLINE_DEMO_MODEL_CACHE") or None,
        metavar="DIR",
        help="digits: keep the trained models in DIR and reuse them when the seed and the "
        "training code are the same, which saves the training on a second run "
        "(env FOGLINE_DEMO_MODEL_CACHE; default: train every time)",
    )
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=MODEL,
        help="digits: train small digit classifiers; minilm: the pre-trained MiniLM "
        "sentence embedder, int8 on the edge (128 tokens), fp32 in the cloud (512), "
        "sent text (default: %(default)s)",
    )
    parser.set_defaults(func=_main)


class _Stop(Exception):
    """Raised from a signal handler so that every started process is stopped in order."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _main(args: argparse.Namespace) -> int:
    # NOTE: explicit handlers, not Python's default: a demo started in the background
    # inherits SIGINT ignored, and SIGTERM would otherwise skip all clean-up.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stop)
    try:
        return _run(args)
    except _Stop as stop:
        logger.info("stopped by %s", stop)
        return 0 if args.keep_running else 130


def _run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="fogline-demo-"))
        )
        opts = DemoOptions(
            workdir=workdir,
            agents=args.agents,
            broker=args.broker,
            samples=args.samples,
            json=args.json,
            keep_running=args.keep_running,
            seed=args.seed,
            model=args.model,
            hard_example_turn=args.hard_example_turn,
            model_cache=args.model_cache,
        )
        try:
            report = Demo(opts).run()
        except (FoglineError, RuntimeError, OSError) as exc:
            # e.g. AccuracyDropError: int8 lost too much, nothing was published.
            logger.error("demo failed: %s", exc)
            return 1
    return 0 if report["ok"] else 1


class Demo:
    def __init__(self, opts: DemoOptions) -> None:
        self.opts = opts
        self.wd = opts.workdir
        self.procs: list[ManagedProcess] = []
        self.timings: dict[str, float] = {}
        self.model = opts.model

    def run(self) -> dict[str, Any]:
        from fogline.broker import free_port

        with ExitStack() as stack:
            self.control_url = f"http://127.0.0.1:{free_port()}"
            self.fallback_url = f"http://127.0.0.1:{free_port()}"
            agent_configs = self._enroll_agents()
            broker = stack.enter_context(self._start_broker())
            stack.callback(self._stop_all)
            self._start_control(broker.port)
            agents = self.agents = self._start_agents(broker.port, agent_configs)
            compression = self._build_models()
            self._start_fallback(f"{self.model}:{VERSION}")
            rollout = self._roll_out(len(agents))
            results = asyncio.run(self._send_traffic(agents))
            turn = self._hard_example_turn(agents, results) if self._turn_enabled else None
            report = self._report(broker, agents, compression, rollout, results, turn)
            self._print(report)
            if self.opts.keep_running:
                self._wait_for_ctrl_c(broker)
        return report

    # -- processes ---------------------------------------------------------------------

    def _start(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> ManagedProcess:
        proc = ManagedProcess(name, args, self.wd / "logs" / f"{name}.log", env)
        self.procs.append(proc)
        return proc

    def _stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    @property
    def _turn_enabled(self) -> bool:
        return self.model == MODEL and self.opts.hard_example_turn

    @property
    def control_workdir(self) -> Path:
        return self.wd / "control"

    def _enroll_agents(self) -> list[dict[str, Any]]:
        """Enrollment, as an operator would do it offline: broker login, keys, fallback token."""
        from cloud.enrollment import AgentSettings, enroll_device

        configs = []
        for i in range(1, self.opts.agents + 1):
            device_id = f"device-{i}"
            settings = AgentSettings(
                model=self.model,
                state_dir=str(self.wd / "agents" / device_id),
                fallback_url=self.fallback_url,
                control_url=self.control_url,
            )
            configs.append(enroll_device(self.control_workdir, device_id, settings))
        return configs

    def _start_broker(self) -> Any:
        """The broker with the generated logins and ACL (``fogline broker config``'s files)."""
        from cloud.enrollment import write_broker_config
        from fogline.broker import BrokerSecurity, start_broker

        files = write_broker_config(self.control_workdir, self.wd / "broker-config")
        security = BrokerSecurity(files.password_file, files.acl_file)
        return start_broker(self.opts.broker, workdir=self.wd / "broker", security=security)

    def _start_control(self, broker_port: int) -> None:
        from cloud.control_cli import ControlClient
        from cloud.token_cli import create_token

        # Tokens are made on the control plane's host, in its database, before it starts:
        # admin enrolls the agents, operator publishes and rolls out, viewer feeds the
        # fallback's package fetch.
        workdir = self.wd / "control"
        self.tokens = {r: create_token(workdir, f"demo-{r}", r) for r in ("admin", "operator")}
        self.fallback_token = create_token(workdir, "demo-fallback", "viewer")
        port = self.control_url.rsplit(":", 1)[1]
        proc = self._start(
            "control",
            [
                "control",
                "serve",
                "--workdir",  # its broker login: control/broker-control.json
                str(self.control_workdir),
                "--port",
                port,
                "--broker-port",
                str(broker_port),
                "--fallback-metrics",
                self.fallback_url,
            ],
        )
        proc.wait_ready(
            f"{self.control_url}/api/health", 60, lambda doc: doc.get("broker_connected") is True
        )
        self.control = ControlClient(self.control_url, token=self.tokens["operator"])
        self.admin = ControlClient(self.control_url, token=self.tokens["admin"])
        self.public_key = self.control.get("/api/keys")["keys"][0]["public_key"]
        logger.info("control plane ready at %s", self.control_url)

    def _token_for(self, device_id: str) -> str:
        """Enrollment's token part: each caller of the fallback gets its own, signed."""
        return str(self.admin.post_json(f"/api/devices/{device_id}/token", {})["token"])

    def _start_agents(self, broker_port: int, configs: list[dict[str, Any]]) -> list[Target]:
        from cloud.enrollment import write_agent_config
        from fogline.broker import free_port

        agents = []
        for enrolled in configs:
            device_id, port = enrolled["device_id"], free_port()
            config = {
                **enrolled,
                "broker_port": broker_port,
                "api_port": port,
                # Often enough for a staged rollout's gates to judge within seconds.
                "telemetry_interval_s": 1.0 if self._turn_enabled else 5.0,
                "chunk_timeout_s": 2.0,
                "hard_examples": {"upload_interval_s": 1.0},
            }
            path = self.wd / "agents" / f"{device_id}.json"
            write_agent_config(path, config)
            self._start(device_id, ["edge", "run", "--config", str(path)])
            agents.append(Target(device_id, f"http://127.0.0.1:{port}"))
        for agent, proc in zip(agents, self.procs[-len(agents) :], strict=True):
            proc.wait_ready(f"{agent.url}/v2/health/live", 60)
        return agents

    def _start_fallback(self, model_ref: str) -> None:
        """The fallback fetches the signed cloud package from the control plane itself."""
        port = self.fallback_url.rsplit(":", 1)[1]
        proc = self._start(
            "fallback",
            [
                "fallback",
                "serve",
                "--port",
                port,
                "--control",
                self.control_url,
                "--model",
                model_ref,
                "--cache-dir",
                str(self.wd / "fallback-cache"),
                "--trust-key",
                self.public_key,
                "--device-tokens",
            ],
            env={"FOGLINE_CONTROL_TOKEN": self.fallback_token},  # not argv: ps shows argv
        )
        proc.wait_ready(f"{self.fallback_url}/v2/health/ready", 60)
        logger.info("cloud fallback ready at %s", self.fallback_url)

    # -- models ---------------------------------------------------------------------------

    def _build_models(self) -> dict[str, Any]:
        from fogline.model_build import build_and_publish

        started = time.monotonic()
        if self.model == "minilm":
            from fogline import minilm_demo

            figures, self.corpus = minilm_demo.build_and_publish(
                self.wd / "models", self.control, self.model, VERSION, self.opts.samples
            )
            self.timings["build_seconds"] = time.monotonic() - started
            return figures
        compression, self.split = build_and_publish(
            self.wd / "models",
            self.control,
            MODEL,
            VERSION,
            seed=self.opts.seed,
            progress=not self.opts.json,
            cache=self.opts.model_cache,
        )
        self.timings["build_seconds"] = time.monotonic() - started
        return compression

    def _roll_out(self, n_agents: int) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            online = [
                d for d in self.control.get("/api/devices")["devices"] if d.get("state") == "online"
            ]
            if len(online) >= n_agents or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        rollout_id = self.control.rollout(self.model, VERSION)
        state = self.control.wait_rollout(rollout_id, 120)
        logger.info("rollout %s: %s in %.2fs", rollout_id, state["state"], state["seconds"])
        return state

    # -- traffic and report -------------------------------------------------------------

    async def _send_traffic(self, agents: list[Target]) -> dict[str, Any]:
        if self.model == "minilm":
            from cloud.pipeline.minilm import EDGE_MAX_TOKENS
            from fogline.minilm_demo import send_traffic

            self.app_token = self._token_for("demo-client")
            cloud_target = Target("cloud", self.fallback_url, token=self.app_token)
            return dict(await send_traffic(agents, cloud_target, self.corpus, EDGE_MAX_TOKENS))
        x, y = self._traffic_rows()
        self.app_token = self._token_for("demo-client")  # a device token, for an app
        cloud = [Target("cloud", self.fallback_url, token=self.app_token)]
        heavy = min(48, len(x)) // 16 * 16
        return {
            "edge": await run_phase(agents, MODEL, x, y, route="local"),
            "cloud": await run_phase(cloud, MODEL, x, y, route="auto"),
            "hybrid": await run_phase(agents, MODEL, x, y, route="auto"),
            # Whole batches of 16 only: a short last batch would fit locally, not be heavy.
            "heavy": await run_phase(agents, MODEL, x[:heavy], y[:heavy], route="auto", batch=16),
        }

    def _hard_example_turn(self, agents: list[Target], results: dict[str, Any]) -> dict[str, Any]:
        from fogline.hard_example_turn import run_turn

        x, y = self._traffic_rows()
        return run_turn(
            self.control,
            agents,
            model=MODEL,
            version=VERSION,
            next_version=NEXT_VERSION,
            workdir=self.wd / "models",
            split=self.split,
            seed=self.opts.seed,
            x=x,
            y=y,
            before=results["hybrid"],
        )

    def _traffic_rows(self) -> tuple[Any, Any]:
        x, y = self.split.x_test, self.split.y_test
        if self.opts.samples:
            x, y = x[: self.opts.samples], y[: self.opts.samples]
        return x, y

    def _report(
        self,
        broker: Any,
        agents: list[Target],
        compression: dict[str, Any],
        rollout: dict[str, Any],
        results: dict[str, Any],
        turn: dict[str, Any] | None,
    ) -> dict[str, Any]:
        from fogline.report import build_report

        devices = {d["device_id"]: d for d in self.control.get("/api/devices")["devices"]}
        endpoints = {
            "control": self.control_url,
            "fallback": self.fallback_url,
            "broker": broker.url,
        }
        common: dict[str, Any] = {
            "agents": agents,
            "devices": devices,
            "compression": compression,
            "rollout": rollout,
            "results": results,
            "broker": broker,
            "endpoints": endpoints,
            "timings": self.timings,
        }
        if self.model == "minilm":  # no hard-example turn: the encoder is not retrained
            from fogline.minilm_demo import build_text_report

            report = build_text_report(**common)
        else:
            report = build_report(**common, turn=turn)
        # Printed once, like a notebook's login token: what the operator and an app use.
        report["tokens"] = {"operator": self.tokens["operator"], "app": self.app_token}
        return report

    def _print(self, report: dict[str, Any]) -> None:
        if self.opts.json:
            print(json.dumps(report), flush=True)
        elif self.model == "minilm":
            from fogline.minilm_demo import render_text_table

            print(render_text_table(report), flush=True)
        else:
            print(render_table(report), flush=True)

    def _wait_for_ctrl_c(self, broker: Any) -> None:
        """Serve until Ctrl-C; ProcessError if the broker or the control plane dies.

        One agent dying used to end the whole demo: now it is said on stderr and
        the agent started again, while the others keep serving.
        """
        print(
            f"\nEverything is up. Control plane + dashboard: "
            f"{self.control_url}/#token={self.tokens['operator']}\n"
            f"Cloud fallback (V2): {self.fallback_url}/v2\n"
            + "".join(f"Agent {a.name} (V2): {a.url}/v2\n" for a in self.agents)
            + "Press Ctrl-C to stop.",
            file=sys.stderr,
            flush=True,
        )
        try:
            while True:
                time.sleep(0.5)
                self._watch(broker)
        finally:
            print("\nshutting down...", file=sys.stderr)

    def _watch(self, broker: Any) -> None:
        """One look at every child: a dead core service ends the demo, others restart."""
        if not broker.running():
            raise ProcessError(f"the broker exited with {broker.wait()}; stopping")
        for proc in self.procs:
            code = proc.proc.poll()
            if code is None:
                continue
            if proc.name in CORE_PROCESSES:
                raise ProcessError(f"{proc.name} exited with {code}; stopping:\n{proc.log_tail()}")
            if proc.restarts < MAX_RESTARTS:
                print(
                    f"{proc.name} exited with {code}; starting it again "
                    f"({proc.restarts + 1}/{MAX_RESTARTS}), the others keep serving "
                    f"(log: {proc.log_path})",
                    file=sys.stderr,
                    flush=True,
                )
                proc.restart()
            elif proc.restarts == MAX_RESTARTS:
                print(f"{proc.name} exited with {code} again; left down", file=sys.stderr)
                proc.restarts += 1  # said once
