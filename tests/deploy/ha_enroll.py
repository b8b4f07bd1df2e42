#!/usr/bin/env python3
"""End-to-end: two coordinators sharing PostgreSQL, enrolled by ansible/pi-fleet.yaml.

Four machines booted with systemd under systemd-nspawn, as in enroll.py
(whose machinery this reuses): `db` (the `datastore` group: Debian's
PostgreSQL, set up by the pifleet_datastore role), `coord-a` and `coord-b`
(the `coordinator` group: Mosquitto on the first, a coordinator on each,
both on the shared store) and one Pi. Then the checks a user would make:
PostgreSQL and both coordinators active, the store's URL (with its
password) only in a root-only credential, one coordinator leading and the
other following the same term, `pifleet status` through either, a chat
through the follower; `kill -9` of the leader: the follower leads and
answers; a second run changes nothing.

Needs what enroll.py needs (scripts/test.sh --ha installs it and runs this).

    sudo tests/deploy/ha_enroll.py         # about three minutes with a cached root
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import enroll as e  # noqa: E402  (the machinery of the main end-to-end test)
from enroll import Failure, check, cli, log, playbook, wait_for  # noqa: E402

DB, COORDS, PI = "db", ["coord-a", "coord-b"], "pi-a"


def ready(base):
    """GET /ready: its status and body (503 while no leader leads)."""
    try:
        return 200, e.api(base, "/ready")
    except Failure as failure:
        return None, str(failure)


def roles(bases):
    """Each coordinator's role, leader and term, as its /ready says."""
    out = {}
    for name, base in bases.items():
        status, body = ready(base)
        check(status == 200, f"{name}: /ready: {body}")
        out[name] = (body.get("role"), body.get("leader"), body.get("term"))
    return out


def inventory(workdir, machines, key, ports, archive):
    def host(name, **hostvars):
        return {"ansible_host": "127.0.0.1", "ansible_port": machines[name].ssh_port, **hostvars}

    data = {"all": {
        "vars": {
            "ansible_user": e.ANSIBLE_USER,
            "ansible_ssh_private_key_file": str(key),
            "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null",
            "ansible_python_interpreter": "/usr/bin/python3",
            "pifleet_deb": str(e.DEB),
            "pifleet_mqtt_port": ports["mqtt"],
            "mosquitto_listen_address": "127.0.0.1",
            # The machines share the host's network: PostgreSQL on a free
            # port, on loopback only.
            "pifleet_store_port": ports["pg"],
            "pifleet_datastore_listen_addresses": "127.0.0.1",
            "ollama_version": "0.0.0-e2e",
            "ollama_archive": str(archive[0]),
            "ollama_sha256": {"amd64": archive[1]},
        },
        "children": {
            "datastore": {"hosts": {DB: host(DB)}},
            "coordinator": {"hosts": {
                name: host(name, pifleet_coordinator_api_listen=f"127.0.0.1:{ports[name]}")
                for name in COORDS}},
            "nodes": {"vars": {"ollama_models": ["llama3.2"]}, "hosts": {PI: host(
                PI, agent_capacity=4, ollama_url=f"http://127.0.0.1:{e.free_port()}",
                pifleet_node_api_listen=f"127.0.0.1:{e.free_port()}", pifleet_node_heartbeat_secs=2)}},
        },
    }}
    path = workdir / "inventory" / "inventory.yaml"
    path.parent.mkdir()
    path.write_text(json.dumps(data, indent=2))
    return path


def run_checks(workdir, machines, key):
    ports = {"mqtt": e.free_port(), "pg": e.free_port(), **{name: e.free_port() for name in COORDS}}
    bases = {name: f"http://127.0.0.1:{ports[name]}" for name in COORDS}
    both = ",".join(bases.values())
    inv = inventory(workdir, machines, key, ports, e.ollama_archive(workdir))

    recap, _ = playbook(inv, label="first-run")
    for host in [DB, *COORDS, PI]:
        check(recap.get(host, {}).get("failed") == 0, f"{host} did not finish cleanly: {recap}")
    clusters = machines[DB].ssh("pg_lsclusters --no-header").stdout.split()
    check(clusters[2] == str(ports["pg"]) and clusters[3] == "online",
          f"PostgreSQL's cluster is online on port {ports['pg']}: {clusters}")
    for name in COORDS:
        machine = machines[name]
        check(machine.ssh("systemctl is-active pifleet-coordinator").stdout.strip() == "active",
              f"pifleet-coordinator is active on {name}")
        config = machine.ssh("cat /etc/pifleet/coordinator.toml").stdout
        check("postgres://" not in config and f'id = "{name}"' in config,
              f"{name}: the config names the coordinator and holds no store URL:\n"
              + re.sub(r"postgres://\S*", "postgres://…", config))
        secret = machine.ssh("stat -c '%a %U' /etc/pifleet/credentials/pifleet-coordinator-store_url; "
                             "cat /etc/pifleet/credentials/pifleet-coordinator-store_url",
                             check_rc=False).stdout.split() + ["", "", ""]
        check(secret[:2] == ["600", "root"] and secret[2].startswith("postgres://pifleet:")
              and secret[2].endswith(f"@127.0.0.1:{ports['pg']}/pifleet"),
              f"{name}: the store URL is a root-only credential: {secret[:2]}")
    check(machines[COORDS[1]].ssh("systemctl is-active mosquitto", check_rc=False).stdout.strip() != "active",
          "only the first coordinator host runs the broker")

    seen = wait_for("one coordinator to lead and the other to follow it", lambda: (
        lambda r: sorted(role for role, _, _ in r.values()) == ["follower", "leader"]
        and len({(leader, term) for _, leader, term in r.values()}) == 1 and r)(roles(bases)))
    leader = next(name for name, (role, _, _) in seen.items() if role == "leader")
    follower = next(name for name in COORDS if name != leader)
    term = seen[leader][2]
    log(f"{leader} leads (term {term}), {follower} follows")

    status = wait_for("the Pi in `pifleet status` through the follower", lambda: (
        lambda s: PI in json.dumps(s) and s)(json.loads(cli(bases[follower], "status", "--json").stdout)))
    check(PI in json.dumps(status), f"status through {follower} lists {PI}")
    cli(bases[follower], "spawn", "ha", "--model", "llama3.2", "--count", "2")
    wait_for("both agents running", lambda: e.agents_by_node(bases[leader]) == {PI: 2}, timeout=60)
    answer = cli(bases[follower], "chat", "ha-1", "Hello through the follower").stdout
    check(answer.strip(), "a chat through the follower is answered")

    # kill -9 of the leader's process: a coordinator leads with a new term
    # within seconds (the follower, or the killed one if systemd restarts it
    # before the follower sees the lease expire), and answers.
    killed = time.monotonic()
    machines[leader].ssh("kill -9 $(systemctl show --property=MainPID --value pifleet-coordinator)")
    new_leader, new_term = wait_for("a coordinator to lead with a new term",
                                    lambda: leading_above(bases, term), timeout=30, interval=0.2)
    took = time.monotonic() - killed
    log(f"{new_leader} leads {took:.1f} s after kill -9 of {leader} (term {new_term})")
    check(took <= 10, f"a new term led within 10 s of the kill (took {took:.1f} s)")
    answer = wait_for("a chat answered after the takeover", lambda: run_chat(both), timeout=60)
    check(answer.strip(), "a chat is answered after the takeover")
    # systemd restarts the killed coordinator: both serve again, one leads.
    wait_for(f"both coordinators back, one leading the other on term {new_term}", lambda: (
        lambda r: sorted(role for role, _, _ in r.values()) == ["follower", "leader"]
        and {term for _, _, term in r.values()} == {new_term})(roles(bases)), timeout=60)
    agents = json.loads(cli(both, "agents", "--json").stdout)["agents"]
    check(sorted(a["name"] for a in agents) == ["ha-1", "ha-2"], f"the same agents after the takeover: {agents}")

    recap, _ = playbook(inv, label="second-run")
    changed = {host: r["changed"] for host, r in recap.items() if r["changed"]}
    check(not changed, f"a second run changes nothing: {changed}")
    return took


def leading_above(bases, term):
    """(name, term) of a coordinator that leads with a term above `term`."""
    for name, base in bases.items():
        status, body = ready(base)
        if status == 200 and body.get("role") == "leader" and body.get("term", 0) > term:
            return name, body["term"]
    return None


def run_chat(coordinators):
    proc = e.run([str(e.PIFLEET), "chat", "--no-stream", "ha-2", "still there?", "--coordinator", coordinators],
                 check_rc=False, timeout=60)
    return proc.returncode == 0 and proc.stdout


def main():
    if os.geteuid() != 0:
        sys.exit("tests/deploy/ha_enroll.py needs root (systemd-nspawn, mount)")
    for path in [e.PIFLEET, e.DEB]:
        if not path.exists():
            sys.exit(f"tests/deploy/ha_enroll.py: {path} is missing (scripts/test.sh builds it)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pifleet-e2e-ha-", dir=os.environ.get("PIFLEET_E2E_WORKDIR")))
    key = workdir / "id_ed25519"
    machines = {}
    try:
        e.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        image = e.root_image()
        for name in [DB, *COORDS, PI]:
            machines[name] = e.Machine(name, image, workdir / "machines", key)
        for machine in machines.values():
            machine.wait_booted()
        took = run_checks(workdir, machines, key)
    except (Failure, OSError, subprocess.SubprocessError) as failure:
        log(f"FAILED: {failure}")
        log(f"logs kept in {workdir}")
        sys.exit(1)
    finally:
        for machine in machines.values():
            machine.stop()
    log(f"two coordinators on PostgreSQL end to end: passed in {time.monotonic() - started:.0f}s "
        f"(takeover after kill -9: {took:.1f} s)")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
