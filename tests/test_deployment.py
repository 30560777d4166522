"""Partner-site deployment with real processes: docs/deploy.md, executed.

Every command comes from the guide (blocks marked ``<!-- cmd: NAME -->``) and runs as written,
through bash, with the guide's variables pointed at temporary folders and free ports on
127.0.0.1. Three scenarios, each with its own SuperLink (TLS, SuperNode authentication, state
database) and SuperNodes; every process they start (and its children) is stopped at the end, also
when a test fails, and dies with pytest if pytest itself is killed.

1. Five sites on one SuperLink: three healthy ones complete a 2-round run; site-d has broken data
   (under DP it takes part with noise only and tells its own log why);
   site-e is killed in the middle of the run; a SuperNode with an unregistered key and clients
   that do not trust the CA are turned away.
2. The coordinator (SuperLink + the run) is killed after round 1, restarted, and the run
   resubmitted with ``resume=true``; every training a site ran is exactly one ledger spend.
3. SecAgg+ (``secure-aggregation=true``): four sites, one killed after it shared its keys; the
   round completes from the other three.

Speed (the file takes about 8 minutes of one core's time, on 2 cores): every message a SuperNode receives starts a
fresh ClientApp process (imports of torch, transformers, peft: most of the time here), so the runs
use the tiny BERT, 2 rounds, a fixed noise multiplier and no federated evaluation
(``fraction-evaluate=0``), and the failure cases share one run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pandas as pd
import psutil
import pytest

from tests.conftest import LABELS, make_classification_rows

pytestmark = pytest.mark.deployment

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "deploy.md"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


# --------------------------------------------------------------------------------------------
# The guide


@dataclass(frozen=True)
class Guide:
    commands: dict[str, str]
    settings: dict[str, dict[str, str]]


@cache
def guide() -> Guide:
    text = GUIDE.read_text()
    commands = dict(re.findall(r"<!-- cmd: ([\w-]+) -->\s*```bash\n(.*?)```", text, re.S))
    settings = {
        role: dict(re.findall(r"^export (\w+)=(\S+)", block, re.M))
        for role, block in re.findall(r"<!-- settings: ([\w-]+) -->\s*```bash\n(.*?)```", text, re.S)
    }
    return Guide(commands, settings)


def command(name: str) -> str:
    return guide().commands[name]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_string(config: dict[str, object]) -> str:
    """``flwr run -c`` form: ``key=value`` pairs with TOML values."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in config.items())


# --------------------------------------------------------------------------------------------
# Processes


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(procs: list[subprocess.Popen]) -> None:
    """SIGKILL the processes and all their descendants (collected first: the SuperLink starts
    its SuperExec in a session of its own, so process groups alone would miss it)."""
    victims = [p for proc in procs for p in _tree(proc.pid)]
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=15)
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _die_with_pytest() -> None:
    """In the child: SIGKILL when pytest itself dies (even by SIGKILL), so that no SuperLink or
    SuperNode outlives the session; their own children watch them (Flower's --parent-pid)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the fixtures' finalizers still stop everything
        pass


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Processes:
    """Everything one scenario started; ``stop_all`` ends it all."""

    logs: Path
    started: list[Service] = field(default_factory=list)

    def start(self, name: str, cmd: str, env: dict[str, str], cwd: Path = REPO) -> Service:
        """A long-running guide command (``exec``: bash becomes the server process)."""
        log = self.logs / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {cmd}"], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_pytest,
            )
        service = Service(name, proc, log)
        self.started.append(service)
        return service

    def stop(self, *services: Service) -> None:
        kill_tree([s.proc for s in services])

    def stop_all(self) -> None:
        self.stop(*self.started)


def run_command(cmd: str, env: dict[str, str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """A one-shot guide command, with bash's -e."""
    result = subprocess.run(
        ["bash", "-ec", cmd], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"command failed ({result.returncode}):\n{cmd}\n--- output\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(what: str, condition: Callable[[], object], timeout: float, interval: float = 1.0, log: Callable[[], str] | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    details = f"\n--- log tail\n{log()[-4000:]}" if log else ""
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}{details}")


def base_env(role: str) -> dict[str, str]:
    """This environment without anything the guide's commands read (set per scenario instead)."""
    guide_vars = {name for block in guide().settings.values() for name in block} | {"RUN_ID", "NODE_ID"}
    env = {k: v for k, v in os.environ.items() if k not in guide_vars and not k.startswith(("FLWR_", "FEDLORA_"))}
    # The guide's Flower switches as written (telemetry and update checks off); every other
    # setting is a path, name or port that the scenarios set themselves.
    env |= {k: v for k, v in guide().settings[role].items() if k.startswith("FLWR_") and k != "FLWR_HOME"}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the activated environment of step 1
        "PYTHONUNBUFFERED": "1",  # logs reach the files at once: the tests read them while running
        "COLUMNS": "250",  # rich tables (flwr ls / supernode list) without wrapping
    }
    return env


# --------------------------------------------------------------------------------------------
# Coordinator and sites


@dataclass
class Pki:
    """Made once per session with the guide's commands, copied into each scenario."""

    certificates: Path  # $COORD/certificates of a template coordinator
    other_ca: Path  # ca.crt of an unrelated CA
    keys: Path  # site key pairs: <name>, <name>.pub
    fingerprints: dict[str, str]  # what `fedlora site key` printed for each


@dataclass
class Site:
    name: str
    dir: Path
    data: Path
    env: dict[str, str]
    node_id: int | None = None
    service: Service | None = None

    @property
    def ledger(self) -> Path:
        return self.dir / "privacy-ledger.db"

    def trainings_received(self) -> int:
        """Training messages this site's SuperNode received completely (from its log)."""
        count, receiving = 0, False
        for line in self.service.output().splitlines() if self.service else []:
            if "Receiving: train message" in line:
                receiving = True
            elif "Received successfully" in line and receiving:
                count, receiving = count + 1, False
            elif "Receiving:" in line:
                receiving = False
        return count


class Federation:
    """One coordinator (SuperLink + flwr CLI) and its sites, all started from the guide."""

    def __init__(self, root: Path, pki: Pki, procs: Processes) -> None:
        self.root, self.pki, self.procs = root, pki, procs
        self.coord = root / "coordinator"
        shutil.copytree(pki.certificates, self.coord / "certificates")
        self.port = free_port()
        self.env = base_env("coordinator") | {
            "COORD": str(self.coord), "SUPERLINK_HOST": HOST, "SUPERLINK_BIND": HOST,
            "SUPERLINK_PORT": str(self.port), "FLWR_HOME": str(self.coord / "flwr"), "FEDLORA_SRC": str(REPO),
        }
        self.sites: dict[str, Site] = {}
        self.superlink: Service | None = None
        self.runs: list[Service] = []
        run_command(command("flwr-connection"), self.env)

    # coordinator
    def start_superlink(self) -> None:
        self.superlink = self.procs.start("superlink", command("superlink"), self.env)
        wait_for("the SuperLink to listen", self._listening, 60, 0.5, self.superlink.output)

    def _listening(self) -> bool:
        assert self.superlink.alive(), f"the SuperLink exited:\n{self.superlink.output()[-4000:]}"
        try:
            with socket.create_connection((HOST, self.port), timeout=1):
                return True
        except OSError:
            return False

    def kill_coordinator(self) -> None:
        """The coordinator machine goes down: SuperLink, its ServerApp and the flwr CLI."""
        self.procs.stop(self.superlink, *self.runs)

    def cli(self, name: str, extra_env: dict[str, str] | None = None, check: bool = True, timeout: float = 120):
        return run_command(command(name), self.env | (extra_env or {}), timeout=timeout, check=check)

    def online(self) -> int:
        return list(nodes(self.cli("list-supernodes").stdout).values()).count("online")

    def wait_online(self, count: int, timeout: float = 120) -> None:
        """Until ``flwr supernode list`` shows ``count`` sites online; first, cheaply, until every
        started SuperNode has logged its activation (a CLI call costs a second of CPU)."""
        started = [s for s in self.sites.values() if s.service]

        def activated() -> bool:
            for site in started:
                assert site.service.alive(), f"{site.name}'s SuperNode exited:\n{site.service.output()[-4000:]}"
            return all("SuperNode ID:" in site.service.output() for site in started)

        logs = lambda: "\n".join(f"== {s.name}\n{s.service.output()[-1500:]}" for s in started)  # noqa: E731
        wait_for("the SuperNodes to activate", activated, timeout, 0.5, logs)
        wait_for(f"{count} SuperNodes online", lambda: self.online() >= count, timeout, 3, logs)

    # sites
    def site(self, name: str, rows: pd.DataFrame, register: bool = True) -> Site:
        site_dir = self.root / "sites" / name
        (site_dir / "keys").mkdir(parents=True)
        for suffix in ("", ".pub"):  # `fedlora site` ran once per session for every name
            shutil.copy2(self.pki.keys / f"{name}{suffix}", site_dir / "keys" / f"{name}{suffix}")
        shutil.copy2(self.coord / "certificates" / "ca.crt", site_dir / "ca.crt")  # sent by the coordinator
        data = site_dir / "data" / "notes.csv"
        data.parent.mkdir()
        rows.to_csv(data, index=False)
        env = base_env("site") | {
            "SITE_NAME": name, "SITE_DIR": str(site_dir), "SITE_DATA": str(data), "SITE_ROWS": str(len(rows)),
            "SUPERLINK_HOST": HOST,
            "SUPERLINK_PORT": str(self.port), "SUPERNODE_PORT": str(free_port()), "FLWR_HOME": str(site_dir / "flwr"),
        }
        site = Site(name, site_dir, data, env)
        run_command(command("node-config"), env)
        if register:
            self.register(site)
        self.sites[name] = site
        return site

    def register(self, site: Site) -> None:
        keys = self.coord / "site-keys"
        keys.mkdir(exist_ok=True)
        shutil.copy2(site.dir / "keys" / f"{site.name}.pub", keys / f"{site.name}.pub")  # sent by the site
        out = self.cli("register", {"SITE_NAME": site.name}).stdout
        site.node_id = int(re.search(r"SuperNode (\d+) registered", out).group(1))

    def start_site(self, site: Site, extra_env: dict[str, str] | None = None) -> Service:
        site.service = self.procs.start(f"supernode-{site.name}", command("supernode"), site.env | (extra_env or {}))
        return site.service

    # runs
    def submit(self, config: dict[str, object], resume: bool = False) -> Service:
        service = self.procs.start("resume" if resume else "run", command("resume" if resume else "run"),
                                   self.env | {"RUN_CONFIG": run_config_string(config)})
        self.runs.append(service)
        return service

    def finish(self, run: Service, timeout: float) -> int:
        """Wait for ``flwr run --stream`` to return; the run's ID, checked finished:completed."""
        try:
            run.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not finish in {timeout}s:\n{run.output()[-6000:]}") from None
        output = run.output()
        assert run.proc.returncode == 0, output[-6000:]
        run_id = int(re.search(r"Successfully started run (\d+)", output).group(1))
        assert self.run_status(run_id) == "finished:completed", output[-6000:]
        return run_id

    def run_status(self, run_id: int) -> str:
        table = self.cli("list-runs").stdout
        row = next((line for line in table.splitlines() if str(run_id) in line), "")
        match = re.search(r"(pending|starting|running|finished:\w+)", row)
        return match.group(1) if match else f"not listed:\n{table}"

    def audit(self, ledgers: list[Path]) -> subprocess.CompletedProcess:
        return self.cli("audit", {"LEDGERS": " ".join(str(p) for p in ledgers)}, check=False, timeout=300)


def site_rows(seed: int, n: int = 40) -> pd.DataFrame:
    return pd.DataFrame(make_classification_rows(n, seed=seed))


def fast_config(model: str, out_dir: Path, **overrides: object) -> dict[str, object]:
    """Tiny and fast; DP on, with a fixed noise multiplier (no per-site calibration), fine-tuning
    from round 1 (the probe phase is covered in simulation, ``tests/test_simulation.py``)."""
    return {
        "model": model, "label-names": ",".join(LABELS), "num-server-rounds": 2, "batch-size": 8, "probe-rounds": 0,
        "max-seq-length": 32, "noise-multiplier": 3.0, "dp": True, "min-train-nodes": 3, "min-evaluate-nodes": 3,
        "fraction-evaluate": 0.0, "round-timeout": 240.0, "output-dir": str(out_dir), **overrides,
    }


def ledger_spends(path: Path, mechanism: str | None = "dp-sgd") -> list[dict]:
    """The ledger's spend rows (read-only), each with ``confirmed``: by default the trainings
    (``dp-sgd``), with ``mechanism=None`` the noised metric releases too."""
    if not path.exists():
        return []
    with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM ledger ORDER BY id")]
    confirmed = {r["refers_to"] for r in rows if r["kind"] == "confirm"}
    return [
        r | {"confirmed": r["id"] in confirmed} for r in rows
        if r["kind"] == "spend" and mechanism in (None, r["mechanism"])
    ]


def history(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "history.json").read_text())


def by_site(record: dict) -> dict[str, dict]:
    return {c["client"]: c for c in record["clients"]}


def nodes(listing: str) -> dict[int, str]:
    """Node ID -> status (registered, online, offline, unregistered) from ``flwr supernode list``."""
    return {int(n): status for n, status in re.findall(r"^\W*(\d{6,})\s*│[^│]*│\s*(\w+)", listing, re.M)}


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """`fedlora certs` (ours and an unrelated CA) and `fedlora site` for every site name."""
    root = tmp_path_factory.mktemp("pki")
    env = base_env("coordinator") | {"COORD": str(root / "coordinator"), "SUPERLINK_HOST": HOST}
    run_command(command("certs"), env)
    run_command(command("certs"), env | {"COORD": str(root / "other")})
    fingerprints = {}
    for name in ("site-a", "site-b", "site-c", "site-d", "site-e", "intruder"):
        out = run_command(command("site-key"), base_env("site") | {"SITE_DIR": str(root / "site"), "SITE_NAME": name}).stdout
        fingerprints[name] = re.search(r"Fingerprint: (SHA256:\S+)", out).group(1)
    return Pki(root / "coordinator" / "certificates", root / "other" / "certificates" / "ca.crt", root / "site" / "keys",
               fingerprints)


@pytest.fixture(scope="class")
def procs(tmp_path_factory) -> Iterator[Processes]:
    processes = Processes(tmp_path_factory.mktemp("logs"))
    try:
        yield processes
    finally:
        processes.stop_all()


@dataclass
class Outcome:
    federation: Federation
    out: Path
    run_ids: list[int]
    preflight: subprocess.CompletedProcess | None = None  # `fedlora site check` of a registered site


# --------------------------------------------------------------------------------------------
# The guide itself


def test_guide_commands_and_settings_are_complete():
    g = guide()
    assert set(g.commands) == {
        "check-install", "certs", "superlink", "flwr-connection", "site-key", "fingerprint", "register",
        "list-supernodes", "node-config", "site-status", "site-check", "supernode", "run", "run-log", "list-runs",
        "unregister", "audit", "resume",
    }
    # The variables the tests set are exactly the ones the guide's settings define.
    assert set(g.settings["coordinator"]) == {
        "COORD", "SUPERLINK_HOST", "SUPERLINK_BIND", "SUPERLINK_PORT", "FLWR_HOME", "FEDLORA_SRC",
        "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK",
    }
    assert set(g.settings["site"]) == {
        "SITE_NAME", "SITE_DIR", "SITE_DATA", "SITE_ROWS", "SUPERLINK_HOST", "SUPERLINK_PORT", "SUPERNODE_PORT",
        "FLWR_HOME", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK",
    }
    assert set(g.settings["run"]) == {"RUN_CONFIG"} and set(g.settings["audit"]) == {"LEDGERS"}
    assert set(g.settings["registration"]) == {"SITE_NAME", "NODE_ID"}
    # The example run config uses real run-config keys and an absolute output-dir.
    from fedlora.run_config import default_run_config

    example = re.search(r"RUN_CONFIG='(.*)'", GUIDE.read_text()).group(1)
    pairs = dict(re.findall(r'([\w-]+)=("[^"]*"|\S+)', example))
    assert set(pairs) <= set(default_run_config()), set(pairs) - set(default_run_config())
    assert Path(json.loads(pairs["output-dir"])).is_absolute()


def test_installed_tools():
    run_command(command("check-install"), base_env("coordinator"), timeout=120)


# --------------------------------------------------------------------------------------------
# 1. One SuperLink, five sites: three healthy ones complete the run, one has broken data, one
#    dies in the middle of the run; strangers are kept out.

HEALTHY = ("site-a", "site-b", "site-c")


@pytest.fixture(scope="class")
def federation(pki, procs, tiny_bert, tmp_path_factory) -> Outcome:
    fed = Federation(tmp_path_factory.mktemp("federation"), pki, procs)
    fed.start_superlink()
    for seed, name in enumerate(HEALTHY):
        fed.site(name, site_rows(seed))
    fed.site("site-d", pd.DataFrame({"text": ["chest pain", "dry cough"] * 10, "diagnosis": ["cardio", "pulmo"] * 10}))
    doomed = fed.site("site-e", site_rows(4))
    preflight = run_command(command("site-check"), fed.sites["site-a"].env, check=False, timeout=180)
    for site in fed.sites.values():
        fed.start_site(site)
    fed.wait_online(5)
    out = fed.root / "runs" / "study"
    # The three healthy sites suffice. round-timeout bounds the wait for site-e; the SuperLink
    # usually answers for it sooner, once its heartbeats stop (node unavailable).
    config = fast_config(tiny_bert, out, **{"min-train-nodes": 3, "min-valid-updates": 3, "round-timeout": 120.0})
    run = fed.submit(config)
    # site-e goes down (SuperNode and its ClientApp) as soon as it holds its round-2 training.
    wait_for("site-e to receive round 2", lambda: doomed.trainings_received() >= 2, 420, 0.2, run.output)
    fed.procs.stop(doomed.service)
    run_id = fed.finish(run, timeout=420)
    return Outcome(fed, out, [run_id], preflight)


@pytest.mark.usefixtures("federation")
class TestFederation:
    def test_three_sites_complete_both_rounds(self, federation, tiny_bert):
        from peft import PeftModel

        from fedlora.model import load_base_model

        fed, out = federation.federation, federation.out
        rounds = history(out)
        assert [r["round"] for r in rounds] == [1, 2] and all(r["failure"] is None for r in rounds)
        for record in rounds:
            sites = by_site(record)
            for name in HEALTHY:
                assert sites[name]["outcome"] == "aggregated" and sites[name]["epsilon"] > 0, sites[name]
                assert sites[name]["node_id"] == fed.sites[name].node_id
        model = PeftModel.from_pretrained(load_base_model(tiny_bert, "classification", LABELS), out / "adapter")
        assert any("lora_" in name for name, _ in model.named_parameters())
        assert (out / "report.md").is_file() and (out / "checkpoints" / "round-2").is_dir()
        assert json.loads((out / "config.json").read_text())["output-dir"] == str(out)
        report = out / "privacy_report.json"
        if report.exists():  # server/privacy_report.py: the coordinator's view matches the ledgers
            sites = json.loads(report.read_text())["sites"]
            assert set(sites) == set(fed.sites) - {"intruder"}, set(sites)
            for name in HEALTHY:
                assert sites[name]["latest_epsilon"] == pytest.approx(ledger_spends(fed.sites[name].ledger, None)[-1]["epsilon"])
            assert sites["site-d"]["refusals"] == []  # see test_a_site_with_broken_data_...

    def test_ledgers_record_every_training_and_pass_the_audit(self, federation):
        (run_id,) = federation.run_ids
        sites = federation.federation.sites
        for name in HEALTHY:
            spends = ledger_spends(sites[name].ledger)
            assert [(s["run_id"], s["round"], s["confirmed"]) for s in spends] == [
                (str(run_id), 1, True), (str(run_id), 2, True),
            ], name
            assert sites[name].trainings_received() == 2
        # site-e's ledger too (round 1, and round 2 if it got that far before it was killed), and
        # site-d's noise-only rounds.
        ledgers = [s.ledger for s in sites.values() if s.ledger.exists()]
        assert len(ledgers) == 5
        audit = federation.federation.audit(ledgers)
        assert audit.returncode == 0, audit.stdout + audit.stderr

    def test_a_site_killed_mid_run_is_named_and_the_run_goes_on(self, federation):
        fed, rounds = federation.federation, history(federation.out)
        assert by_site(rounds[0])["site-e"]["outcome"] == "aggregated"
        lost = by_site(rounds[1])["site-e"]
        assert lost["outcome"] in ("no-reply", "failed") and lost["node_id"] == fed.sites["site-e"].node_id, lost
        assert f"round 2: site-e {lost['outcome']}" in (federation.out / "report.md").read_text()
        # Every entry names its site: also the SuperLink's "node unavailable" reply for site-e.
        assert all(c["client"] in fed.sites for r in rounds for c in r["clients"]), rounds[1]["clients"]

    def test_a_site_with_broken_data_tells_its_operator_not_the_coordinator(self, federation):
        """site-d's file has no 'label' column. Whether a column exists can hang on one record
        (JSON), so a DP site never refuses over its data: it takes part with noise only, and
        the reason is in its own SuperNode log, not at the coordinator."""
        fed, rounds = federation.federation, history(federation.out)
        site = fed.sites["site-d"]
        report = (federation.out / "report.md").read_text()
        for record in rounds:
            entry = by_site(record)["site-d"]
            assert entry["outcome"] == "aggregated", entry
            assert str(site.data) not in json.dumps(record) and "diagnosis" not in json.dumps(record)
        assert str(site.data) not in report
        assert "missing column 'label'" in site.service.output()
        assert "takes part with noise only" in site.service.output()
        # It answered round 2 too, it is still up, and its noise-only rounds are on its ledger.
        assert site.trainings_received() == 2 and site.service.alive()
        assert len(ledger_spends(site.ledger)) == 2
    def test_run_log_and_unregistering_a_site(self, federation):
        fed, (run_id,) = federation.federation, federation.run_ids
        log = fed.cli("run-log", {"RUN_ID": str(run_id)}).stdout
        assert "[ROUND 2/2]" in log and "results in" in log, log[-3000:]
        gone = fed.sites["site-e"].node_id
        fed.cli("unregister", {"NODE_ID": str(gone)})
        assert nodes(fed.cli("list-supernodes").stdout).get(gone, "unregistered") == "unregistered"

    def test_each_site_sees_every_round_in_its_own_log_and_its_budget(self, federation, pki):
        """The site's operator sees what each message cost and what is left; the coordinator's
        streamed log names each site's outcome every round; the site's budget and its key's
        fingerprint read the same at both ends."""
        fed = federation.federation
        site = fed.sites["site-a"]
        log = site.service.output()
        for round_ in (1, 2):
            line = next(line for line in log.splitlines() if f"site-a round {round_}: trained" in line)
            assert "this message" in line and "left of max-epsilon 8" in line and "of its 2.0000" in line, line
        status = run_command(command("site-status"), site.env).stdout
        assert "spent      epsilon" in status and "next run   may spend up to" in status, status
        streamed = fed.runs[0].output()
        for round_ in (1, 2):
            for name in HEALTHY:
                assert f"round {round_}: {name} aggregated" in streamed, streamed[-3000:]
        assert pki.fingerprints["site-a"] in fed.cli("fingerprint", {"SITE_NAME": "site-a"}).stdout

    def test_the_preflight_check_of_a_registered_site_passes(self, federation, pki):
        check = federation.preflight
        assert check.returncode == 0, check.stdout + check.stderr
        assert "ok   reachable" in check.stdout and "ok   TLS" in check.stdout
        assert f"ok   key accepted: the key {pki.fingerprints['site-a']} is registered" in check.stdout

    def test_a_supernode_with_an_unregistered_key_is_refused(self, federation, pki):
        """The site's pre-flight says in plain words that its key is not registered, and the
        coordinator's log names the key by the fingerprint the site printed."""
        fed = federation.federation
        intruder = fed.site("intruder", site_rows(9), register=False)
        check = run_command(command("site-check"), intruder.env, check=False, timeout=180)
        assert check.returncode == 1 and "ok   TLS" in check.stdout, check.stdout + check.stderr
        assert (f"FAILED  key accepted: the coordinator has not registered this key ({pki.fingerprints['intruder']})"
                in check.stdout), check.stdout
        service = fed.start_site(intruder)
        wait_for("the unregistered SuperNode to be refused", lambda: not service.alive(), 60, 1, service.output)
        assert service.proc.returncode != 0
        assert "Failed to activate SuperNode" in service.output(), service.output()
        coordinator = fed.superlink.output()
        assert "No SuperNode found with the given public key" in coordinator
        assert f"public key {pki.fingerprints['intruder']} [no key in {fed.coord / 'site-keys'} has it]" in coordinator
        assert "BEGIN PUBLIC KEY" not in coordinator
        listed = nodes(fed.cli("list-supernodes").stdout)
        assert set(listed) <= {s.node_id for s in fed.sites.values() if s.node_id}, listed

    def test_clients_that_do_not_trust_the_ca_cannot_connect(self, federation, pki, tmp_path):
        fed = federation.federation
        # A SuperNode with a registered key and node config, but another CA: no TLS handshake.
        site = fed.sites["site-a"]
        stranger = tmp_path / "site-a"
        shutil.copytree(site.dir / "keys", stranger / "keys")
        shutil.copy2(site.dir / "node-config.toml", stranger / "node-config.toml")
        shutil.copy2(pki.other_ca, stranger / "ca.crt")
        env = site.env | {"SITE_DIR": str(stranger), "SUPERNODE_PORT": str(free_port()), "FLWR_HOME": str(stranger / "flwr")}
        service = fed.procs.start("supernode-other-ca", command("supernode"), env)
        wait_for("the SuperNode without the CA to give up", lambda: not service.alive(), 60, 1, service.output)
        assert service.proc.returncode != 0
        assert re.search(r"certificate|ssl|tls", service.output(), re.I), service.output()
        # The flwr CLI with a connection that trusts another CA.
        other = tmp_path / "coordinator"
        (other / "certificates").mkdir(parents=True)
        shutil.copy2(pki.other_ca, other / "certificates" / "ca.crt")
        env = fed.env | {"COORD": str(other), "FLWR_HOME": str(other / "flwr")}
        run_command(command("flwr-connection"), env)
        result = run_command(command("list-runs"), env, check=False)
        assert result.returncode != 0
        assert "Connection to the SuperLink is unavailable" in result.stdout + result.stderr, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------
# 2. The coordinator goes down after round 1; the run is resubmitted with resume=true.


@pytest.fixture(scope="class")
def restart(pki, procs, tiny_bert, tmp_path_factory) -> Outcome:
    fed = Federation(tmp_path_factory.mktemp("restart"), pki, procs)
    fed.start_superlink()
    sites = [fed.site(name, site_rows(seed)) for seed, name in enumerate(("site-a", "site-b"))]
    for site in sites:
        fed.start_site(site)
    fed.wait_online(2)
    out = fed.root / "runs" / "study"
    config = fast_config(tiny_bert, out, **{"min-train-nodes": 2})
    first = fed.submit(config)
    # Down it goes once round 1 is checkpointed and every site holds its round-2 training.
    wait_for(
        "round 1's checkpoint and round 2 at every site",
        lambda: (out / "checkpoints" / "round-1").is_dir() and all(s.trainings_received() >= 2 for s in sites),
        420, 0.2, first.output,
    )
    fed.kill_coordinator()
    assert not (out / "checkpoints" / "round-2").exists(), "killed too late: round 2 had finished"
    first_run = int(re.search(r"Successfully started run (\d+)", first.output()).group(1))
    # The sites' SuperNodes stay up and finish the round-2 training they hold.
    wait_for(
        "the interrupted round's trainings to be recorded",
        lambda: all(any(s["round"] == 2 and s["confirmed"] for s in ledger_spends(site.ledger)) for site in sites),
        300, 1,
    )
    fed.start_superlink()  # the same command: the same --database
    second_run = fed.finish(fed.submit(config, resume=True), timeout=420)
    return Outcome(fed, out, [first_run, second_run])


@pytest.mark.usefixtures("restart")
class TestCoordinatorRestart:
    def test_the_resubmitted_run_resumes_from_round_1(self, restart):
        out = restart.out
        rounds = history(out)
        checkpoint = json.loads((out / "checkpoints" / "round-1" / "state.json").read_text())
        assert [r["round"] for r in rounds] == [1, 2]
        assert rounds[0] == checkpoint["history"][0]  # round 1 was not run again
        assert {n for n, c in by_site(rounds[1]).items() if c["outcome"] == "aggregated"} == {"site-a", "site-b"}
        assert json.loads((out / "config.json").read_text())["resume"] is True
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert "resuming" in restart.federation.runs[-1].output()
        # The interrupted run stays in the SuperLink's database and never completed; whether the
        # restarted SuperLink has already marked it "finished:failed" or still shows "running"
        # depends on when it notices the dead ServerApp.
        assert restart.federation.run_status(restart.run_ids[0]) in ("finished:failed", "running")

    def test_every_training_is_exactly_one_ledger_spend(self, restart):
        first_run, second_run = restart.run_ids
        sites = restart.federation.sites.values()
        for site in sites:
            spends = ledger_spends(site.ledger)
            # round 1 and the interrupted round 2 under the first run; round 2 again under the second
            assert [(s["run_id"], s["round"]) for s in spends] == [
                (str(first_run), 1), (str(first_run), 2), (str(second_run), 2),
            ], site.name
            assert all(s["confirmed"] for s in spends)
            assert site.trainings_received() == len(spends) == 3
        audit = restart.federation.audit([s.ledger for s in sites])
        assert audit.returncode == 0, audit.stdout + audit.stderr



SECURE_SITES = (*HEALTHY, "site-d")


@pytest.fixture(scope="class")
def secure(pki, procs, tiny_bert, tmp_path_factory) -> Outcome:
    """SecAgg+ over TLS: four sites, and site-d's SuperNode goes down once it holds the round's
    training (the third protocol message: after it shared its keys). Three stay in the sum, each
    with two others whose masks the server never learns."""
    fed = Federation(tmp_path_factory.mktemp("secure"), pki, procs)
    fed.start_superlink()
    sites = [fed.site(name, site_rows(seed)) for seed, name in enumerate(SECURE_SITES)]
    for site in sites:
        fed.start_site(site)
    fed.wait_online(len(sites))
    out = fed.root / "runs" / "secure"
    config = fast_config(tiny_bert, out, **{"num-server-rounds": 1, "secure-aggregation": True, "round-timeout": 120.0,
                                            "min-train-nodes": len(sites)})
    run = fed.submit(config)
    doomed = fed.sites["site-d"]
    wait_for("site-d to receive its training", lambda: doomed.trainings_received() >= 3, 420, 0.2, run.output)
    fed.procs.stop(doomed.service)
    return Outcome(fed, out, [fed.finish(run, timeout=420)])


@pytest.mark.usefixtures("secure")
class TestSecureAggregation:
    def test_the_round_completes_from_the_sites_left_and_says_so(self, secure):
        (record,) = history(secure.out)
        assert record["failure"] is None
        assert record["secure_aggregation"] == {"sites": 4, "summed": 3, "dropped": 1, "shares": 4, "threshold": 3,
                                                "clipping_range": 1.0}
        sites = by_site(record)
        assert all(sites[name]["outcome"] == "aggregated" for name in HEALTHY)
        # round 1 is its first: the coordinator has not learnt site-d's name, only its node id
        (lost,) = [c for c in record["clients"] if c["node_id"] == secure.federation.sites["site-d"].node_id]
        assert lost["outcome"] in ("failed", "no-reply"), lost
        assert "secure aggregation: ON" in (secure.out / "report.md").read_text()
        assert (secure.out / "adapter" / "adapter_model.safetensors").is_file()

    def test_every_site_charged_its_training_and_the_ledgers_pass_the_audit(self, secure):
        sites = secure.federation.sites
        for name in HEALTHY:
            assert [s["confirmed"] for s in ledger_spends(sites[name].ledger)] == [True]
        # site-d went down holding its training: it may have charged it (then it is audited too) or not
        audit = secure.federation.audit([sites[name].ledger for name in SECURE_SITES if sites[name].ledger.exists()])
        assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.fixture(scope="class")
def distributed(pki, procs, tiny_bert, tmp_path_factory) -> Outcome:
    """Distributed DP over TLS: three sites whose node configs consent to it
    (``distributed-dp-colluders = 0``), one round, every sum holding all three."""
    fed = Federation(tmp_path_factory.mktemp("distributed"), pki, procs)
    fed.start_superlink()
    sites = [fed.site(name, site_rows(seed)) for seed, name in enumerate(HEALTHY)]
    for site in sites:
        node_config = site.dir / "node-config.toml"
        node_config.write_text(node_config.read_text() + "distributed-dp-colluders = 0\n")
        fed.start_site(site)
    fed.wait_online(len(sites))
    out = fed.root / "runs" / "distributed"
    config = fast_config(tiny_bert, out, **{"num-server-rounds": 1, "secure-aggregation": True, "dp-mode": "distributed",
                                            "min-valid-updates": 3, "round-timeout": 120.0})
    run = fed.submit(config)
    return Outcome(fed, out, [fed.finish(run, timeout=420)])


@pytest.mark.usefixtures("distributed")
class TestDistributedDP:
    def test_the_round_is_one_secure_sum_of_noisy_gradients_and_the_ledgers_say_so(self, distributed):
        (record,) = history(distributed.out)
        assert record["failure"] is None and record["secure_aggregation"]["summed"] == 3
        assert all(by_site(record)[name]["outcome"] == "aggregated" for name in HEALTHY)
        assert "differential privacy: ON, distributed:" in (distributed.out / "report.md").read_text()
        sites = distributed.federation.sites
        for name in HEALTHY:
            assert [s["confirmed"] for s in ledger_spends(sites[name].ledger, "distributed:skellam")] == [True]
        audit = distributed.federation.audit([sites[name].ledger for name in HEALTHY])
        assert audit.returncode == 0, audit.stdout + audit.stderr
