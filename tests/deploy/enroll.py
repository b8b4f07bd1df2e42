#!/usr/bin/env python3
"""End-to-end enrollment of a fleet by ansible/pi-fleet.yaml, on real systemd.

Four "machines" are Debian roots made by debootstrap (cached between runs)
and booted with their own systemd under systemd-nspawn on the host network,
each with sshd on its own loopback port: a coordinator host and three Pis.
The playbooks log in as `pi`, who uses sudo, as on Raspberry Pi OS. Each
Pi's Ollama is installed by the ollama role from a local release archive
(checksum pinned) of Ollama's layout whose `bin/ollama serve` starts
`pifleet ollama-sim` (Ollama cannot be downloaded here).

The playbook installs Mosquitto with users and ACLs, the coordinator and two
nodes of different agent_capacity; then the checks a user would make:
units active, the daemons' own lines in the journal, both nodes in
`pifleet status`, agents placed in proportion to capacity, a chat answered.
An Ollama archive with the wrong sha256 installs nothing; the seed's
`--limit new-pi-node --extra-vars "pi_hostname=... pi_ip=...
agent_capacity=..."` enrolls the third Pi; a second run and --check change
nothing; upgrade.yaml rolls a new version one Pi at a time under chats;
`systemctl stop pifleet-node` moves a Pi's agents and `start` brings it back;
the broker refuses anonymous clients and keeps each user in its lane;
remove-node.yaml retires a Pi.

Needs root, systemd-nspawn, debootstrap, Ansible and mosquitto-clients
(scripts/test.sh installs them), target/debug/pifleet, the Pi package's
amd64 build target/lean/pi/pifleet and its .deb (tests/deploy/check.sh
builds both).

    sudo tests/deploy/enroll.py            # about six minutes with a cached root
"""

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PIFLEET = Path(os.environ.get("PIFLEET_BIN", REPO / "target/debug/pifleet"))
VERSION = re.search(r'^version = "(.*)"$', (REPO / "Cargo.toml").read_text(), re.M).group(1)
DEB = Path(os.environ.get("PIFLEET_DEB", REPO / f"target/deb/pifleet_{VERSION}_amd64.deb"))
# The binary that DEB packages (the Pi package's build), for a new version of it.
DEB_BINARY = Path(os.environ.get("PIFLEET_DEB_BINARY", REPO / "target/lean/pi/pifleet"))
CACHE = Path(os.environ.get("PIFLEET_E2E_CACHE", Path.home() / ".cache/pifleet-e2e"))
SUITE = "bookworm"
MIRROR = os.environ.get("PIFLEET_E2E_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "systemd,systemd-sysv,dbus,openssh-server,python3,python3-apt,sudo,ca-certificates"
ANSIBLE_PLAYBOOK = shutil.which("ansible-playbook") or "ansible-playbook"
# Who the playbooks log in as: not root.
ANSIBLE_USER = "pi"

# The fleet: inventory name -> agent_capacity (None: the coordinator host).
# new-pi-node is the seed's placeholder, enrolled later as aria128.
COORDINATOR = "coord"
PIS = {"pi-a": 2, "pi-b": 4}
NEW_PI = ("new-pi-node", "aria128", 3)


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Failure(Exception):
    pass


def check(condition, what):
    if not condition:
        raise Failure(what)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, check_rc=True, timeout=120, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check_rc and proc.returncode != 0:
        raise Failure(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def wait_for(what, probe, timeout=60, interval=0.5):
    """Calls probe() until it returns a true value, which is returned."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except (Failure, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            last = e
        time.sleep(interval)
    raise Failure(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# --- machines ---------------------------------------------------------------


def root_image():
    """The debootstrapped root, built once and kept under CACHE."""
    key = hashlib.sha256(f"{SUITE} {PACKAGES}".encode()).hexdigest()[:12]
    image = CACHE / f"{SUITE}-{key}"
    if (image / "usr/bin/python3").exists():
        return image
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix="debootstrap-"))
    log(f"debootstrap {SUITE} into {image} (cached for later runs)")
    run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(tmp), MIRROR], timeout=900)
    tmp.rename(image)
    return image


class Machine:
    """A Debian root booted with systemd under systemd-nspawn, on an overlay
    of the cached image, reachable over SSH on its own loopback port."""

    def __init__(self, name, image, workdir, key):
        self.name = name
        self.ssh_port = free_port()
        self.key = key
        self.dir = workdir / name
        self.root = self.dir / "root"
        for sub in ("upper", "work", "root"):
            (self.dir / sub).mkdir(parents=True)
        run(["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={image},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}", str(self.root)])
        self.mounted = True
        (self.root / "etc/hostname").write_text(name + "\n")
        sshd = self.root / "etc/ssh/sshd_config.d"
        sshd.mkdir(parents=True, exist_ok=True)
        (sshd / "e2e.conf").write_text(
            f"Port {self.ssh_port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\n")
        ssh_dir = self.root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
        # The playbooks log in as `pi`, who uses sudo without a password, as
        # on Raspberry Pi OS (its /etc/sudoers.d/010_pi-nopasswd); the test's
        # own probes log in as root.
        run(["chroot", str(self.root), "useradd", "--create-home", "--shell", "/bin/bash",
             "--groups", "sudo", ANSIBLE_USER])
        sudoers = self.root / "etc/sudoers.d/010_pi-nopasswd"
        sudoers.write_text(f"{ANSIBLE_USER} ALL=(ALL) NOPASSWD: ALL\n")
        sudoers.chmod(0o440)
        run(["chroot", str(self.root), "install", "-d", "-m", "700", "-o", ANSIBLE_USER, "-g", ANSIBLE_USER,
             f"/home/{ANSIBLE_USER}/.ssh"])
        run(["chroot", str(self.root), "install", "-m", "600", "-o", ANSIBLE_USER, "-g", ANSIBLE_USER,
             "/root/.ssh/authorized_keys", f"/home/{ANSIBLE_USER}/.ssh/authorized_keys"])
        self.console = open(self.dir / "console.log", "w")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "-M", name, "--register=no", "--keep-unit",
             "--boot", "--console=passive", "--link-journal=no"],
            stdout=self.console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def ssh(self, command, check_rc=True, timeout=60):
        return run(["ssh", "-i", str(self.key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                    "-o", "LogLevel=error", "root@127.0.0.1", command], check_rc=check_rc, timeout=timeout)

    def wait_booted(self):
        def up():
            if self.proc.poll() is not None:
                raise Failure(f"{self.name}: systemd-nspawn exited {self.proc.returncode}; see {self.dir}/console.log")
            state = self.ssh("systemctl is-system-running --wait", check_rc=False).stdout.strip()
            return state in ("running", "degraded") and state
        state = wait_for(f"{self.name} to boot", up, timeout=90, interval=1)
        if state == "degraded":
            failed = self.ssh("systemctl --failed --no-legend --plain", check_rc=False).stdout
            log(f"{self.name} booted degraded: {failed.strip()}")
            # The playbooks log in as `pi`: a failed systemd-user-sessions
            # leaves /run/nologin, which refuses every user but root (seen
            # once in a container here). Start it again, as an admin would.
            if "systemd-user-sessions" in failed:
                self.ssh("systemctl restart systemd-user-sessions || rm -f /run/nologin", check_rc=False)
                left = self.ssh("ls /run/nologin", check_rc=False).stdout.strip()
                check(not left, f"{self.name}: /run/nologin still refuses users other than root")
                log(f"{self.name}: systemd-user-sessions started again; users may log in")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # systemd-nspawn powers the container off
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.console.close()
        if self.mounted:
            run(["umount", str(self.root)], check_rc=False)
            self.mounted = False


# --- the fleet's own tools ---------------------------------------------------


OLLAMA_STAND_IN = """#!/bin/sh
# Ollama's bin/ollama in pifleet's end-to-end test: `serve` starts the simulator.
here=$(dirname "$(readlink -f "$0")")
case "$1" in
    serve) exec "$here/../lib/ollama/pifleet" ollama-sim --listen "${OLLAMA_HOST:-127.0.0.1:11434}" \\
        --models tinyllama --first-token-ms 0 --tokens-per-sec 5000 ;;
    -v|--version) echo "ollama version is @VERSION@" ;;
    *) echo "ollama (pifleet e2e stand-in): only serve" >&2; exit 2 ;;
esac
"""


def ollama_archive(workdir, version="0.0.0-e2e"):
    """An archive of Ollama's release layout (bin/ollama, lib/ollama/) whose
    `bin/ollama serve` starts `pifleet ollama-sim` on OLLAMA_HOST: the role
    installs it as it installs Ollama. Its path and sha256."""
    tree = workdir / f"ollama-archive-{version}"
    (tree / "bin").mkdir(parents=True)
    (tree / "lib/ollama").mkdir(parents=True)
    (tree / "bin/ollama").write_text(OLLAMA_STAND_IN.replace("@VERSION@", version))
    (tree / "bin/ollama").chmod(0o755)
    # Without its debug information: a few MB to copy to each Pi, not 100s.
    run(["objcopy", "--strip-debug", str(PIFLEET), str(tree / "lib/ollama/pifleet")])
    archive = workdir / version / "ollama-linux-amd64.tgz"
    archive.parent.mkdir()
    run(["tar", "-C", str(tree), "-czf", str(archive), "bin", "lib"])
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def ollama_models(url):
    """The models the Ollama at `url` has."""
    with urllib.request.urlopen(url + "/api/tags", timeout=5) as r:
        check(r.status == 200, f"GET {url}/api/tags answered {r.status}")
        return sorted(m["name"] for m in json.load(r)["models"])


def api(base, path):
    """GET on the coordinator's API; the status must be 200."""
    try:
        with urllib.request.urlopen(base + path, timeout=10) as r:
            check(r.status == 200, f"GET {path} answered {r.status}")
            return json.load(r)
    except urllib.error.HTTPError as e:
        raise Failure(f"GET {path} answered {e.code}: {e.read()[:200]!r}") from e


def cli(base, *args, timeout=60):
    """`pifleet ARGS --coordinator BASE` (client options follow the command)."""
    return run([str(PIFLEET), *args, "--coordinator", base], timeout=timeout)


def nodes(base):
    return {n["node"]: n for n in api(base, "/v1/nodes")["nodes"]}


def agents_by_node(base):
    """Running agents per node; raises (so that a timeout shows it) while
    any agent is not running."""
    placed, waiting = {}, []
    for agent in api(base, "/v1/agents")["agents"]:
        if agent["state"] == "running":
            placed[agent["node"]] = placed.get(agent["node"], 0) + 1
        else:
            waiting.append((agent["name"], agent["state"], agent.get("pending_reason")))
    check(not waiting, f"agents not running: {waiting}")
    return placed


RECAP = re.compile(r"^(\S+)\s*: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def playbook(inventory, *extra, label, must_fail=False, book="pi-fleet.yaml"):
    log(f"ansible-playbook {book} {' '.join(extra) or '(full run)'}: {label}")
    proc = run([ANSIBLE_PLAYBOOK, "-i", str(inventory), str(REPO / "ansible" / book), *extra],
               check_rc=False, timeout=900, env={**os.environ, "ANSIBLE_FORCE_COLOR": "0",
                                                 "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False"})
    (inventory.parent / f"{label}.log").write_text(proc.stdout + proc.stderr)
    if must_fail:
        check(proc.returncode != 0, f"ansible-playbook ({label}) should have failed:\n{proc.stdout[-3000:]}")
        return None, proc.stdout
    if proc.returncode != 0:
        raise Failure(f"ansible-playbook ({label}) exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    recap = {host: {"ok": int(ok), "changed": int(changed), "failed": int(failed), "unreachable": int(unreachable)}
             for host, ok, changed, unreachable, failed in RECAP.findall(proc.stdout)}
    check(recap, f"no PLAY RECAP in the output of {label}")
    return recap, proc.stdout


def mqtt(tool, port, user, password, *args, timeout=10):
    cmd = [tool, "-h", "127.0.0.1", "-p", str(port)]
    if user is not None:
        cmd += ["-u", user, "-P", password]
    return run(cmd + list(args), check_rc=False, timeout=timeout)


def retained(port, user, password, topic, *tls):
    """Retained messages under `topic` as the given user sees them (`tls`:
    mosquitto_sub's TLS options)."""
    sub = mqtt("mosquitto_sub", port, user, password, *tls, "-t", topic, "-v", "--retained-only", "-W", "2")
    # 27: the -W timeout, after the retained messages (if any) arrived.
    check(sub.returncode in (0, 27), f"mosquitto_sub as {user} on {topic}: rc {sub.returncode} {sub.stderr.strip()}")
    return [line for line in sub.stdout.splitlines() if line.strip()]


# --- the test ----------------------------------------------------------------


def enroll(workdir):
    key = workdir / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    image = root_image()
    machines = {}
    try:
        for name in [COORDINATOR, *PIS, NEW_PI[0]]:
            machines[name] = Machine(name, image, workdir / "machines", key)
        for machine in machines.values():
            machine.wait_booted()
        log("four machines booted with systemd")
        run_checks(workdir, machines, key)
    finally:
        for machine in machines.values():
            machine.stop()


def inventory(workdir, machines, key, mqtt_port, api_port, archive):
    def host(name, **hostvars):
        return {"ansible_host": "127.0.0.1", "ansible_port": machines[name].ssh_port, **hostvars}

    def pi(name, **hostvars):
        return host(name, ollama_url=f"http://127.0.0.1:{free_port()}", pifleet_node_api_listen=f"127.0.0.1:{free_port()}",
                    pifleet_node_heartbeat_secs=2, **hostvars)

    nodes_group = {name: pi(name, agent_capacity=cap, pifleet_node_labels={"board": "pi5" if cap > 2 else "pi4"})
                   for name, cap in PIS.items()}
    # This machine has no thermal zone and no Pi firmware. Point pi-b's probe
    # at two other sysfs files (lo's MTU, 65536, read as millidegrees; its
    # addr_assign_type, 0, as throttle flags) to show that the unit's
    # sandbox lets the node read /sys.
    nodes_group["pi-b"].update(pifleet_node_temperature_file="/sys/class/net/lo/mtu",
                               pifleet_node_throttled_file="/sys/class/net/lo/addr_assign_type")
    nodes_group[NEW_PI[0]] = pi(NEW_PI[0], ansible_host="{{ pi_ip | default('') }}")
    data = {"all": {
        "vars": {
            "ansible_user": ANSIBLE_USER,
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            "pifleet_deb": str(DEB),
            "pifleet_mqtt_port": mqtt_port,
            "mosquitto_listen_address": "127.0.0.1",
            # Ollama as the role installs it: from a local archive, checked.
            "ollama_version": "0.0.0-e2e",
            "ollama_archive": str(archive[0]),
            "ollama_sha256": {"amd64": archive[1]},
        },
        "children": {
            "coordinator": {"hosts": {COORDINATOR: host(
                COORDINATOR, pifleet_coordinator_api_listen=f"127.0.0.1:{api_port}",
                pifleet_coordinator_node_lost_after_secs=8)}},
            "nodes": {"vars": {"ollama_models": ["llama3.2"]}, "hosts": nodes_group},
        },
    }}
    path = workdir / "inventory" / "inventory.yaml"
    path.parent.mkdir()
    path.write_text(json.dumps(data, indent=2))  # JSON is YAML
    return path


def run_checks(workdir, machines, key):
    mqtt_port, api_port = free_port(), free_port()
    base = f"http://127.0.0.1:{api_port}"
    archive = ollama_archive(workdir)
    inv = inventory(workdir, machines, key, mqtt_port, api_port, archive)
    hostvars = json.loads(inv.read_text())["all"]["children"]["nodes"]["hosts"]
    credentials = inv.parent / "credentials"

    # 1. One run enrolls the broker, the coordinator and two nodes.
    recap, _ = playbook(inv, label="first-run")
    for host in [COORDINATOR, *PIS]:
        check(recap.get(host, {}).get("failed") == 0, f"{host} did not finish cleanly: {recap}")
    check(machines[COORDINATOR].ssh("systemctl is-active mosquitto pifleet-coordinator").stdout.split()
          == ["active", "active"], "mosquitto and pifleet-coordinator are active on the coordinator host")
    for name in PIS:
        machine = machines[name]
        check(machine.ssh("systemctl is-active pifleet-node").stdout.strip() == "active",
              f"pifleet-node active on {name}")
        journal = machine.ssh("journalctl -u pifleet-node --no-pager -o cat").stdout
        check(f"node {name} ready: online" in journal,
              f"the journal of {name} holds the daemon's own lines:\n{journal[-2000:]}")
        check("llama3.2:latest" in ollama_models(hostvars[name]["ollama_url"]),
              f"the ollama role installed Ollama and pulled llama3.2 on {name}")
        ollama = machine.ssh("systemctl is-active ollama; readlink /usr/local/bin/ollama; "
                             "systemctl show -p User --value ollama").stdout.split()
        check(ollama == ["active", "/opt/ollama/0.0.0-e2e-amd64/bin/ollama", "ollama"],
              f"Ollama runs from the pinned archive as its own user on {name}: {ollama}")
        conf = machine.ssh("cat /etc/pifleet/node.toml; stat -c '%a %U' /etc/pifleet/credentials/pifleet-node-mqtt_password; "
                           "ls /etc/pifleet/node.env; cat /etc/systemd/system/pifleet-node.service.d/credentials.conf",
                           check_rc=False).stdout
        check(f"\nagent_capacity = {PIS[name]}\n" in conf and "600 root\n" in conf and "node.env" not in conf
              and "LoadCredential=mqtt_password:/etc/pifleet/credentials/pifleet-node-mqtt_password" in conf
              and "password =" not in conf,
              f"{name}'s configuration renders its capacity; its broker password is a systemd credential "
              f"in a root-only file (not in the config, not in the environment):\n{conf}")
    log("units active, journals hold the daemons' lines, models pulled")

    # The units' limits and weights, and the store's directory opened.
    shown = machines[COORDINATOR].ssh(
        "systemctl show -p LimitNOFILE -p ReadWritePaths pifleet-coordinator").stdout
    check("LimitNOFILE=65536" in shown and ("ReadWritePaths=-/var/lib/pifleet" in shown or "ReadWritePaths=/var/lib/pifleet" in shown),
          f"the coordinator's unit: 65,536 descriptors, its store's directory writable:\n{shown}")
    shown = machines["pi-a"].ssh("systemctl show -p CPUWeight -p OOMScoreAdjust pifleet-node").stdout
    check("CPUWeight=1000" in shown and "OOMScoreAdjust=-500" in shown,
          f"the node's unit ranks it above Ollama:\n{shown}")
    # An API reachable beyond loopback without a token is refused by name.
    _, out = playbook(inv, "--limit", COORDINATOR, "--extra-vars", "pifleet_coordinator_api_listen=0.0.0.0:9470",
                      label="open-api-without-token", must_fail=True)
    check("is reachable beyond this host: set" in out and "pifleet_coordinator_api_token" in out,
          f"the refusal names the setting:\n{out[-3000:]}")
    log("units: descriptors, store path, node above Ollama; an open API without a token refused")

    online = wait_for("both nodes online in pifleet status", lambda: (
        lambda st: all(n["state"] == "online" for n in st["nodes"] if n["node"] in PIS)
        and {n["node"] for n in st["nodes"]} >= set(PIS) and st)(
        json.loads(cli(base, "status", "--json").stdout)))
    caps = {n["node"]: n["agent_capacity"] for n in online["nodes"]}
    check(caps == PIS, f"pifleet status shows the inventory's capacities: {caps}")
    # Under the hardened unit, sysinfo still reads /proc and the probe /sys.
    for name, node in nodes(base).items():
        check(node["cpu"]["cores"] >= 1 and node["memory"]["total_bytes"] > 0,
              f"{name} reports its cores and memory from /proc: {node['cpu']}, {node['memory']}")
    pi_b = nodes(base)["pi-b"]
    check(abs((pi_b["temperature_c"] or 0) - 65.536) < 0.01 and pi_b["throttled"] is False,
          f"pi-b reads its temperature and throttle files in /sys: {pi_b['temperature_c']}, {pi_b['throttled']}")
    log(f"pifleet status: {caps}")

    # 2. Agents in proportion to capacity; a chat answered.
    # Half the capacity first: a scheduler that ignored capacity would not
    # split 3 agents 1:2; then the rest, which fills both exactly.
    total = sum(PIS.values())
    cli(base, "spawn", "worker", "--model", "llama3.2", "--count", str(total // 2))
    placed = wait_for("the first agents running", lambda: (
        lambda p: sum(p.values()) == total // 2 and p)(agents_by_node(base)), timeout=60)
    check(placed == {"pi-a": 1, "pi-b": 2}, f"3 agents on 2- and 4-agent nodes land 1 and 2: {placed}")
    cli(base, "spawn", "more", "--model", "llama3.2", "--count", str(total - total // 2))
    placed = wait_for("every agent running", lambda: (
        lambda p: sum(p.values()) == total and p)(agents_by_node(base)), timeout=60)
    check(placed == PIS, f"{total} agents fill 2- and 4-agent nodes exactly: {placed}")
    answer = cli(base, "chat", "worker-1", "Hello from the e2e test").stdout
    check(answer.strip(), "a chat turn is answered")
    log(f"spawn --count 3 placed 1:2, then --count 3 more {placed}; chat answered")

    # 3. The seed's command enrolls one more Pi; first with an Ollama
    #    archive whose sha256 is not the pinned one, which installs nothing.
    name, hostname, capacity = NEW_PI
    wrong = "0" * 64
    _, out = playbook(inv, "--limit", name, "--extra-vars",
                      f"pi_hostname={hostname} pi_ip=127.0.0.1 agent_capacity={capacity}",
                      "--extra-vars", json.dumps({"ollama_sha256": {"amd64": wrong}}),
                      label="wrong-ollama-sha256", must_fail=True)
    check(f"has sha256 {archive[1]}, not ollama_sha256.amd64 {wrong}" in out and "nothing was installed" in out,
          f"the refusal gives both sums:\n{out[-3000:]}")
    left = machines[name].ssh("ls /usr/local/bin/ollama /opt/ollama/*/bin /var/cache/pifleet-ollama/*; "
                              "getent passwd ollama; dpkg-query -W pifleet; ls /etc/systemd/system/ollama.service",
                              check_rc=False).stdout
    check(not left.strip(), f"a wrong sha256 installs nothing (no Ollama, no user, no unit, no pifleet): {left!r}")
    log("an Ollama archive with the wrong sha256: refused, both sums named, nothing installed")
    recap, _ = playbook(inv, "--limit", name, "--extra-vars",
                        f"pi_hostname={hostname} pi_ip=127.0.0.1 agent_capacity={capacity}", label="enroll-new-pi")
    check(recap.get(name, {}).get("ok", 0) > 10, f"{name} went through the node's tasks: {recap}")
    joined = wait_for(f"{hostname} online", lambda: (
        lambda n: n.get(hostname, {}).get("state") == "online" and n[hostname])(nodes(base)))
    check(joined["agent_capacity"] == capacity, f"{hostname} joined with agent_capacity {capacity}: {joined}")
    journal = machines[name].ssh("journalctl -u pifleet-node --no-pager -o cat").stdout
    check(f"node {hostname} ready: online" in journal, f"the journal of {hostname} holds the daemon's own lines")
    log(f"{hostname} joined with agent_capacity {capacity}")

    # 4. Nothing changes on a second run, full or limited.
    recap, out = playbook(inv, label="second-run")
    check(all(recap.get(h, {}).get("ok", 0) > 0 for h in [COORDINATOR, *PIS]),
          f"the second run went through every host: {recap}")
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"]}
    check(not changed, f"a second full run reports changed=0, not {changed}:\n{out[-4000:]}")
    recap, out = playbook(inv, "--limit", name, "--extra-vars",
                          f"pi_hostname={hostname} pi_ip=127.0.0.1 agent_capacity={capacity}", label="enroll-again")
    check(recap.get(name, {}).get("ok", 0) > 10, f"enrolling again went through the node's tasks: {recap}")
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"]}
    check(not changed, f"enrolling {hostname} again reports changed=0, not {changed}:\n{out[-4000:]}")
    log("second runs: changed=0")

    # 5. --check --diff on the enrolled fleet: no change, no failure; tags
    # run their part only.
    recap, out = playbook(inv, "--check", "--diff", label="check-mode")
    bad = {h: r for h, r in recap.items() if r["changed"] or r["failed"]}
    check(not bad and all(recap.get(h, {}).get("ok", 0) > 0 for h in [COORDINATOR, *PIS]),
          f"--check --diff reports no change and no failure, not {bad}:\n{out[-4000:]}")
    recap, out = playbook(inv, "--tags", "node,models", "--limit", "pi-a", label="tags-node")
    check(recap.get("pi-a", {}).get("ok", 0) > 10 and not recap["pi-a"]["changed"],
          f"--tags node,models goes through the node's tasks and changes nothing: {recap}")
    check("Install Debian's Mosquitto broker" not in out and "Pull the models" in out
          and "Install the pifleet package" in out,
          f"--tags node,models runs the node's tasks with their package and the model pulls only:\n{out[-4000:]}")
    log("--check --diff: no change, no failure; --tags node,models runs its part")
    check_upgrade(inv, machines, base, name, hostname, capacity)

    # 5. systemctl stop: the node says offline and its agents run elsewhere.
    dashboard = ("dashboard", (credentials / "mqtt-dashboard").read_text().strip())
    machines["pi-a"].ssh("systemctl stop pifleet-node")
    stopped = machines["pi-a"].ssh("systemctl show -p ActiveState -p Result -p ExecMainStatus pifleet-node").stdout
    check(sorted(stopped.split()) == ["ActiveState=inactive", "ExecMainStatus=0", "Result=success"],
          f"the node stopped cleanly within TimeoutStopSec (exit 0, not killed): {stopped}")
    status = retained(mqtt_port, *dashboard, "pifleet/nodes/pi-a/status")
    check(status == ["pifleet/nodes/pi-a/status offline"], f"a stopped node leaves a retained offline: {status}")
    moved = wait_for("pi-a's agents running elsewhere", lambda: (
        lambda p: "pi-a" not in p and sum(p.values()) == total and p)(agents_by_node(base)), timeout=60)
    # (The rebalancer may already have moved one of pi-b's agents to the new
    # Pi: where each lands is the scheduler's business, tested elsewhere.)
    capacities = {**PIS, hostname: capacity}
    check(moved.get(hostname, 0) >= 1 and all(n <= capacities[node] for node, n in moved.items()),
          f"pi-a's agents run on pi-b and {hostname}, within their capacities: {moved}")
    log(f"systemctl stop pifleet-node on pi-a: agents now {moved}")

    # 6. The broker, as the mosquitto role configured it (pi-a is stopped, so
    #    its user is free to play the attacker: client id = user name).
    check_broker(mqtt_port, credentials, dashboard)

    machines["pi-a"].ssh("systemctl start pifleet-node")
    wait_for("pi-a online again", lambda: nodes(base)["pi-a"]["state"] == "online")
    status = retained(mqtt_port, *dashboard, "pifleet/nodes/pi-a/status")
    check(status == ["pifleet/nodes/pi-a/status online"], f"pi-a announces online again: {status}")
    log("systemctl start pifleet-node: pi-a online again")

    # 7. The units as installed on a Pi: verified by systemd itself.
    verify = machines["pi-b"].ssh("systemd-analyze verify /lib/systemd/system/pifleet-node.service "
                                  "/lib/systemd/system/pifleet-coordinator.service 2>&1", check_rc=False)
    check(verify.returncode == 0 and not verify.stdout.strip(),
          f"systemd-analyze verify on an enrolled Pi: {verify.stdout}")

    # 8. Removing a Pi for good: drained, purged, its broker user gone,
    #    forgotten. One agent is stopped first so that the rest fit on the
    #    other nodes.
    placed = agents_by_node(base)
    total = sum(placed.values())
    on_b = [a["name"] for a in json.loads(cli(base, "agents", "--json").stdout)["agents"] if a["node"] == "pi-b"]
    cli(base, "stop", on_b[0])
    wait_for("one agent fewer", lambda: sum(agents_by_node(base).values()) == total - 1)
    password_b = (credentials / "mqtt-node-pi-b").read_text().strip()
    recap, out = playbook(inv, "--extra-vars", "node=pi-b drain_deadline_secs=60", label="remove-node",
                          book="remove-node.yaml")
    check(not any(r["failed"] for r in recap.values()), f"remove-node.yaml ran cleanly: {recap}")
    after = wait_for("pi-b's agents running on the other nodes", lambda: (
        lambda p: "pi-b" not in p and sum(p.values()) == total - 1 and p)(agents_by_node(base)), timeout=30)
    check("pi-b" not in nodes(base), f"the coordinator no longer lists pi-b: {sorted(nodes(base))}")
    purged = machines["pi-b"].ssh("dpkg-query -W -f='${db:Status-Abbrev}' pifleet", check_rc=False).stdout
    left = machines["pi-b"].ssh("ls /etc/pifleet /etc/systemd/system/pifleet-node.service.d "
                                "/var/lib/private/pifleet-node /usr/local/bin/ollama /opt/ollama "
                                "/etc/systemd/system/ollama.service /usr/share/ollama; getent passwd ollama; "
                                "pgrep -u ollama", check_rc=False).stdout
    check("ii" not in purged and "rc" not in purged and not left.strip(),
          f"pifleet is purged (not just removed) on pi-b, its drop-ins and state too, and Ollama with its "
          f"models, unit and user: {purged!r} {left!r}")
    check(not (credentials / "mqtt-node-pi-b").exists(), "pi-b's broker password is gone from the controller")
    refused = mqtt("mosquitto_pub", mqtt_port, "pi-b", password_b, "-t", "pifleet/e2e", "-m", "x")
    check(refused.returncode != 0 and "not authorised" in refused.stderr.lower(),
          f"pi-b's broker user is gone: rc {refused.returncode} {refused.stderr!r}")
    log(f"remove-node.yaml: pi-b drained ({after}), purged, its broker user refused, forgotten")

    # 9. TLS on the broker: the fleet (without pi-b) enrolled again with
    #    pifleet_mqtt_tls.
    check_tls(workdir, machines, base, mqtt_port, credentials, dashboard, hostname)


def check_tls(workdir, machines, base, mqtt_port, credentials, dashboard, hostname):
    """pi-fleet.yaml with pifleet_mqtt_tls: true makes a fleet CA on the
    controller and a certificate for Mosquitto, whose TLS listener is then
    the only one; every daemon connects over TLS, verifying the broker with
    the CA, and mosquitto_sub with the CA sees the fleet."""
    tls_port = free_port()
    data = json.loads((workdir / "inventory" / "inventory-full.yaml").read_text())
    del data["all"]["children"]["nodes"]["hosts"]["pi-b"]
    data["all"]["vars"].update(pifleet_mqtt_tls=True, pifleet_mqtt_tls_port=tls_port)
    tls_inv = workdir / "inventory" / "inventory-tls.yaml"
    tls_inv.write_text(json.dumps(data, indent=2))
    # --check first, with no certificate made yet: it shows the change and
    # fails nowhere.
    recap, out = playbook(tls_inv, "--check", "--diff", label="tls-check-first")
    check(not any(r["failed"] for r in recap.values()) and recap[COORDINATOR]["changed"],
          f"--check --diff right after turning TLS on shows changes and no failure: {recap}\n{out[-3000:]}")
    check((credentials / "tls" / "ca.pem").is_file(), "--check made the fleet CA on the controller")
    recap, out = playbook(tls_inv, label="tls")
    check(not any(r["failed"] for r in recap.values()), f"pi-fleet.yaml with TLS ran cleanly: {recap}")
    ca = credentials / "tls" / "ca.pem"
    check(ca.is_file() and not (credentials / "tls" / "ca.key").stat().st_mode & 0o077,
          "the fleet CA is kept beside the credentials, its key readable by its owner only")
    with socket.socket() as plain:
        try:
            plain.connect(("127.0.0.1", mqtt_port))
            check(False, f"the plain MQTT port {mqtt_port} still accepts connections")
        except ConnectionRefusedError:
            pass
    pis = {"pi-a": "pi-a", hostname: NEW_PI[0]}
    wait_for("the nodes online over TLS", lambda: all(nodes(base)[n]["state"] == "online" for n in pis), timeout=60)
    connected = f"connected to MQTT broker 127.0.0.1:{tls_port} (TLS, verified with /etc/pifleet/mqtt-ca.pem)"
    for unit, host in [("pifleet-coordinator", COORDINATOR), *[("pifleet-node", h) for h in pis.values()]]:
        journal = machines[host].ssh(f"journalctl -u {unit} --no-pager -o cat").stdout
        check(connected in journal, f"{unit} on {host} connected over TLS, verifying the broker with the CA:\n"
                                    f"{journal[-1500:]}")
    statuses = retained(tls_port, *dashboard, "pifleet/nodes/+/status", "--cafile", str(ca))
    check({f"pifleet/nodes/{n}/status online" for n in pis} <= set(statuses),
          f"mosquitto_sub with the fleet CA sees the fleet: {statuses}")
    other = workdir / "other-ca"
    other.mkdir()
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(other / "ca.key"), "-out", str(other / "ca.pem"), "-days", "1", "-subj", "/CN=other"])
    refused = mqtt("mosquitto_sub", tls_port, *dashboard, "--cafile", str(other / "ca.pem"),
                   "-t", "pifleet/#", "-W", "2")
    check(refused.returncode not in (0, 27), f"a client with another CA is refused: rc {refused.returncode}")
    # The certificates start on 2020-01-01, not on the controller's clock: a
    # client whose clock is 400 days behind (a Pi without a battery-backed
    # clock) accepts the broker.
    # (libfaketime preloaded, not the `faketime` wrapper, whose semaphores
    # collide with those processes killed by the Rust tests left behind.)
    libfaketime = next(iter(glob.glob("/usr/lib/*-linux-gnu/faketime/libfaketime.so.1")), None)
    check(libfaketime, "libfaketime is installed (scripts/test.sh installs faketime)")
    behind = run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(tls_port),
                  "-u", dashboard[0], "-P", dashboard[1], "--cafile", str(ca), "-t", "pifleet/nodes/pi-a/status",
                  "-v", "--retained-only", "-W", "2"], check_rc=False,
                 env={**os.environ, "LD_PRELOAD": libfaketime, "FAKETIME": "-400d"})
    check(behind.returncode in (0, 27) and "pifleet/nodes/pi-a/status online" in behind.stdout,
          f"a client 400 days behind accepts the broker's certificate: rc {behind.returncode} {behind.stderr.strip()}")
    log(f"TLS: plain port {mqtt_port} closed; coordinator and nodes on {tls_port} verified with the fleet CA; "
        "mosquitto_sub with the CA sees the fleet (also 400 days behind), with another CA it is refused")
    recap, out = playbook(tls_inv, label="tls-again")
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"]}
    check(not changed and not any(r["failed"] for r in recap.values()),
          f"a second run with TLS reports changed=0, not {changed}:\n{out[-4000:]}")
    recap, out = playbook(tls_inv, "--check", "--diff", label="tls-check")
    bad = {h: r for h, r in recap.items() if r["changed"] or r["failed"]}
    check(not bad, f"--check --diff with TLS on reports no change and no failure, not {bad}:\n{out[-4000:]}")
    log("TLS: a second run changed=0; --check --diff no change, no failure")


def check_upgrade(inv, machines, base, placeholder, hostname, capacity):
    """ansible/upgrade.yaml: refuses while the coordinator knows a node the
    inventory lacks; with it, rolls a package of a new version over the Pis
    one at a time (at most one drained at any moment, each node restarted
    once) and then the coordinator host, while one client per agent chats
    on without a failed chat; a second run changes nothing."""
    _, out = playbook(inv, label="upgrade-refused", book="upgrade.yaml", must_fail=True)
    check(f"knows nodes the inventory lacks: {hostname}" in out, f"the refusal names {hostname}:\n{out[-3000:]}")
    # A package of a new version, built from the same binary.
    new_version = f"{VERSION}+e2e.1"
    deb = run(["scripts/package-deb.sh", "amd64", str(DEB_BINARY)], cwd=REPO,
              env={**os.environ, "PIFLEET_DEB_VERSION": new_version}).stdout.strip().splitlines()[-1]
    new_deb = REPO / deb
    check(new_deb.is_file() and new_version in new_deb.name, f"package-deb.sh wrote the new version: {deb}")
    # The Pi enrolled through the placeholder, in the inventory now, the new
    # package and a new Ollama.
    new_ollama = "0.0.1-e2e"
    ollama = ollama_archive(inv.parent.parent, new_ollama)
    data = json.loads(inv.read_text())
    data["all"]["vars"].update(pifleet_deb=str(new_deb), ollama_version=new_ollama, ollama_archive=str(ollama[0]),
                               ollama_sha256={"amd64": ollama[1]})
    nodes_group = data["all"]["children"]["nodes"]["hosts"]
    nodes_group[hostname] = {**nodes_group[placeholder], "ansible_host": "127.0.0.1", "agent_capacity": capacity}
    full = inv.parent / "inventory-full.yaml"
    full.write_text(json.dumps(data, indent=2))
    hosts = {"pi-a": "pi-a", "pi-b": "pi-b", hostname: placeholder}
    ready = lambda host, node: machines[host].ssh(  # noqa: E731
        f"journalctl -u pifleet-node --no-pager -o cat | grep -c 'node {node} ready'", check_rc=False).stdout.strip()
    before = {node: int(ready(host, node) or 0) for node, host in hosts.items()}
    # A turn that fails after the install (the node's /ready asked on a port
    # it does not listen on): the run stops naming pi-a, which stays
    # cordoned, and its package is not noted installed, so that the next run
    # takes it up again.
    marker = "/var/cache/pifleet/installed.sha256"
    _, out = playbook(full, "--limit", "pi-a", "--extra-vars",
                      json.dumps({"pifleet_node_api_listen": "127.0.0.1:1", "upgrade_ready_retries": 1}),
                      label="upgrade-fails", book="upgrade.yaml", must_fail=True)
    fatal = out.find("fatal: [pi-a]")
    failed_at = re.findall(r"^TASK \[(.*)\]", out[:fatal], re.M)[-1:] if fatal >= 0 else []
    check(failed_at == ["Wait until the node is ready again"]
          and re.search(r"^pi-a\s*: ok=\d+\s+changed=\d+\s+unreachable=0\s+failed=1", out, re.M),
          f"the failed turn stops the run at pi-a's readiness check:\n{out[-3000:]}")
    check(nodes(base)["pi-a"]["cordoned"], "a Pi whose turn failed stays cordoned")
    noted = machines["pi-a"].ssh(f"cat {marker}; ls /var/cache/pifleet/upgrade-pending").stdout.split()
    check(noted == [hashlib.sha256(DEB.read_bytes()).hexdigest(), "/var/cache/pifleet/upgrade-pending"],
          f"a Pi whose turn failed keeps the old package noted installed and its turn pending: {noted}")
    log("upgrade.yaml: a turn failed after the install stops the run at pi-a, cordoned, not noted upgraded")
    # Room for any one node's agents on the others (9 slots, the largest
    # node 4): two of the six agents stop for the upgrade, so that a drain
    # never waits for its deadline and leaves an agent without a node.
    agents = sorted(a["name"] for a in api(base, "/v1/agents")["agents"])
    resting, agents = agents[:2], agents[2:]
    for agent in resting:
        cli(base, "stop", agent)
    wait_for("two agents fewer", lambda: len(api(base, "/v1/agents")["agents"]) == len(agents))
    stop = threading.Event()
    answered, failures, retries, most_cordoned = {a: 0 for a in agents}, [], [0], [0]

    def client(agent):
        """One client per agent, chatting on. `pifleet chat` asks again,
        within --wait, only on a retryable error (a 503 with Retry-After
        naming a move, or no connection): each time it says so on stderr."""
        while not stop.is_set():
            try:
                proc = run([str(PIFLEET), "chat", "--no-stream", "--wait", "30", agent, "still there?",
                            "--coordinator", base], check_rc=False, timeout=90)
            except subprocess.TimeoutExpired:
                failures.append(f"{agent}: no answer within 90 s")
                continue
            retries[0] += proc.stderr.count("asking again in")
            if proc.returncode == 0 and proc.stdout.strip():
                answered[agent] += 1
            else:
                failures.append(f"{agent}: rc {proc.returncode} {proc.stderr.strip()[-300:]}")

    def watch_cordons():
        while not stop.is_set():
            try:
                cordoned = [n for n, v in nodes(base).items() if v["cordoned"]]
                most_cordoned[0] = max(most_cordoned[0], len(cordoned))
            except (Failure, OSError, ValueError):
                pass  # the coordinator restarting, last
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(a,), daemon=True) for a in agents]
    threads.append(threading.Thread(target=watch_cordons, daemon=True))
    for thread in threads:
        thread.start()
    try:
        recap, out = playbook(full, label="upgrade", book="upgrade.yaml")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    check(not any(r["failed"] for r in recap.values()), f"upgrade.yaml ran cleanly: {recap}")
    after = {node: int(ready(host, node) or 0) for node, host in hosts.items()}
    # pi-a: once in the failed turn, once when this run took it up again.
    check(all(after[n] == before[n] + (2 if n == "pi-a" else 1) for n in hosts),
          f"each node restarted once by the run (pi-a twice, with the failed turn): {before} -> {after}")
    for node, host in hosts.items():
        switched = machines[host].ssh("readlink /usr/local/bin/ollama; ls /opt/ollama; systemctl is-active ollama; "
                                      "cat /var/cache/pifleet/installed.sha256; ls /var/cache/pifleet/upgrade-pending",
                                      check_rc=False).stdout.split()
        check(switched == [f"/opt/ollama/{new_ollama}-amd64/bin/ollama", f"{new_ollama}-amd64", "active",
                           hashlib.sha256(new_deb.read_bytes()).hexdigest()],
              f"{host} runs Ollama {new_ollama}, the old version removed, the package noted installed, "
              f"its turn ended: {switched}")
        check("llama3.2:latest" in ollama_models(data["all"]["children"]["nodes"]["hosts"][node]["ollama_url"]),
              f"the models were pulled again into {host}'s new Ollama")
    for host in [*hosts.values(), COORDINATOR]:
        installed = machines[host].ssh("dpkg-query -W -f='${Version}' pifleet").stdout
        check(installed == new_version, f"{host} has pifleet {new_version} installed, not {installed!r}")
    check(not failures and all(answered.values()),
          f"every chat answered during the upgrade ({answered}); failed: {failures}")
    check(most_cordoned[0] == 1, f"at most one Pi drained at any moment, and one was: {most_cordoned[0]}")
    listed = nodes(base)
    check(all(listed[n]["state"] == "online" and not listed[n]["cordoned"] for n in hosts),
          f"every node online and uncordoned after the upgrade: {listed}")
    check(sum(agents_by_node(base).values()) == len(agents), "the same number of agents running")
    log(f"upgrade.yaml: one Pi at a time to {new_version} and Ollama {new_ollama}, each node restarted once; "
        f"{sum(answered.values())} chats from {len(agents)} clients meanwhile, none failed, "
        f"{retries[0]} asked again on a retryable error")
    recap, out = playbook(full, label="upgrade-again", book="upgrade.yaml")
    changed = {h: r["changed"] for h, r in recap.items() if r["changed"]}
    check(not changed and not any(r["failed"] for r in recap.values()),
          f"a second upgrade.yaml run reports changed=0, not {changed}:\n{out[-4000:]}")
    check(all(int(ready(host, node) or 0) == after[node] for node, host in hosts.items()),
          "the second run restarted no node")
    log("upgrade.yaml again: changed=0, no node drained or restarted")
    for agent in resting:
        cli(base, "spawn", agent, "--model", "llama3.2")
    wait_for("all six agents running again", lambda: sum(agents_by_node(base).values()) == len(agents) + 2)


def check_broker(port, credentials, dashboard):
    node_a = ("pi-a", (credentials / "mqtt-node-pi-a").read_text().strip())
    marker = f"e2e-{os.getpid()}"

    anonymous = mqtt("mosquitto_pub", port, None, None, "-t", "pifleet/e2e", "-m", marker)
    check(anonymous.returncode != 0 and "not authorised" in anonymous.stderr.lower(),
          f"an anonymous client is refused: rc {anonymous.returncode} {anonymous.stderr!r}")
    wrong = mqtt("mosquitto_pub", port, node_a[0], "wrong-password", "-t", "pifleet/e2e", "-m", marker)
    check(wrong.returncode != 0 and "not authorised" in wrong.stderr.lower(),
          f"a wrong password is refused: rc {wrong.returncode} {wrong.stderr!r}")

    # Writes that must not land: retained, so that a dashboard subscribing
    # afterwards would see any that did. pi-b's own retained status and
    # capacity show that the dashboard sees what is there.
    before = retained(port, *dashboard, "pifleet/nodes/pi-b/#")
    check(any(line.startswith("pifleet/nodes/pi-b/status online") for line in before)
          and any(line.startswith("pifleet/nodes/pi-b/capacity {") for line in before),
          f"the dashboard user reads pi-b's retained status and capacity: {before}")
    attempts = [
        (node_a, "pifleet/nodes/pi-b/status"),
        (node_a, "pifleet/nodes/pi-b/capacity"),
        (node_a, "pifleet/nodes/pi-b/cmd"),
        (node_a, "pifleet/nodes/pi-a/cmd"),
        (dashboard, "pifleet/nodes/pi-b/cmd"),
        (dashboard, "pifleet/e2e/dashboard"),
        (dashboard, "homeassistant/sensor/e2e/config"),
    ]
    for (user, password), topic in attempts:
        # MQTT 3.1.1 drops a denied publish silently: rc 0 says only that the
        # client connected, so that the check below is not vacuous.
        pub = mqtt("mosquitto_pub", port, user, password, "-q", "1", "-r", "-t", topic, "-m", marker)
        check(pub.returncode == 0, f"{user} connects to publish to {topic}: {pub.stderr.strip()}")
    seen = retained(port, *dashboard, "pifleet/#") + retained(port, *dashboard, "homeassistant/#")
    leaked = [line for line in seen if marker in line]
    check(not leaked, f"denied publishes did not land: {leaked}")
    after = retained(port, *dashboard, "pifleet/nodes/pi-b/#")
    check(any(line == "pifleet/nodes/pi-b/status online" for line in after), f"pi-b still online: {after}")

    # pi-a may not read the fleet: a subscription to # gets nothing of
    # pi-b's retained messages.
    own = retained(port, *node_a, "pifleet/nodes/pi-a/status")
    check(own == ["pifleet/nodes/pi-a/status offline"], f"pi-a reads its own retained status: {own}")
    sub = mqtt("mosquitto_sub", *[port, *node_a], "-t", "#", "-v", "-W", "2")
    check(sub.returncode in (0, 1, 27) and "pifleet/nodes/pi-b" not in sub.stdout,
          f"pi-a's subscription to # sees other nodes: rc {sub.returncode} {sub.stdout[:300]} {sub.stderr[:200]}")
    cmd_b = retained(port, *node_a, "pifleet/nodes/pi-b/#")
    check(cmd_b == [], f"pi-a reads nothing of pi-b: {cmd_b}")
    log("broker: anonymous refused; pi-a cannot write pi-b's topics or commands nor read #; dashboard read-only")


def main():
    if os.geteuid() != 0:
        sys.exit("tests/deploy/enroll.py needs root (systemd-nspawn, mount)")
    for tool in ["systemd-nspawn", "debootstrap", "mosquitto_sub", ANSIBLE_PLAYBOOK]:
        if not shutil.which(tool):
            sys.exit(f"tests/deploy/enroll.py: {tool} not found (scripts/test.sh installs it)")
    for path in [PIFLEET, DEB, DEB_BINARY]:
        if not path.exists():
            sys.exit(f"tests/deploy/enroll.py: {path} is missing (scripts/test.sh builds it)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pifleet-e2e-", dir=os.environ.get("PIFLEET_E2E_WORKDIR")))
    try:
        enroll(workdir)
    except (Failure, OSError, subprocess.SubprocessError) as e:
        log(f"FAILED: {e}")
        log(f"logs kept in {workdir}")
        sys.exit(1)
    log(f"enrollment end to end: passed in {time.monotonic() - started:.0f}s")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
