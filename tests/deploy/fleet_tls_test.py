#!/usr/bin/env python3
"""Checks of ansible/roles/mosquitto/files/fleet_tls.py, the fleet CA and
broker certificate maker, verified with openssl: run by tests/deploy/check.sh
with the Python that runs ansible-playbook.

    python3 tests/deploy/fleet_tls_test.py
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "ansible/roles/mosquitto/files/fleet_tls.py"


def make(directory, *names, broker="coord", check=True, days=3650):
    proc = subprocess.run([sys.executable, "-W", "error", str(SCRIPT), "--dir", str(directory), "--broker", broker,
                           f"--days={days}", *[f"--san={n}" for n in names]], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    return proc


def openssl(*args):
    return subprocess.run(["openssl", *args], capture_output=True, text=True)


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "tls"
        out = make(d, "coord", "127.0.0.1", "localhost")
        assert out["changed"] and len(out["made"]) == 4, out
        ca, cert, key = d / "ca.pem", d / "broker-coord.pem", d / "broker-coord.key"
        assert (d / "ca.key").stat().st_mode & 0o077 == 0 and key.stat().st_mode & 0o077 == 0, "keys are 0600"
        assert not [p for p in d.iterdir() if p.name.startswith(".tmp-")], "no temporary file left"

        # Valid for a clock 400 days behind (a Pi without a battery-backed
        # clock), and for the names and addresses asked.
        behind = str(int(time.time()) - 400 * 86400)
        got = openssl("verify", "-attime", behind, "-CAfile", str(ca), str(cert))
        assert got.returncode == 0, f"a clock 400 days behind refuses the certificate: {got.stdout}{got.stderr}"
        for flag, name in [("-checkhost", "coord"), ("-checkip", "127.0.0.1"), ("-checkhost", "localhost")]:
            got = openssl("x509", "-in", str(cert), "-noout", flag, name)
            assert "does match" in got.stdout, f"{flag} {name}: {got.stdout}"
        got = openssl("x509", "-in", str(cert), "-noout", "-checkhost", "elsewhere")
        assert "does NOT match" in got.stdout, got.stdout

        # Run again: nothing made, nothing touched.
        before = files(d)
        assert make(d, "coord", "127.0.0.1", "localhost") == {"changed": False, "made": []}
        assert files(d) == before

        # Other names: the broker's pair again, the CA kept.
        out = make(d, "coord", "192.168.4.10")
        assert out["changed"] and sorted(Path(p).name for p in out["made"]) == ["broker-coord.key", "broker-coord.pem"]
        assert files(d)["ca.pem"] == before["ca.pem"]
        assert "does match" in openssl("x509", "-in", str(cert), "-noout", "-checkip", "192.168.4.10").stdout

        # A key left beside a certificate it does not match (an interrupted
        # run): found and replaced by a matching pair.
        openssl("genpkey", "-algorithm", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", str(key))
        assert make(d, "coord", "192.168.4.10")["changed"]
        cert_key = openssl("x509", "-in", str(cert), "-noout", "-pubkey").stdout
        assert cert_key and cert_key == openssl("pkey", "-in", str(key), "-pubout").stdout, \
            "the broker's key matches its certificate"

        # A certificate signed by another CA: replaced.
        other = Path(tmp) / "other"
        make(other, "coord", "192.168.4.10")
        os.replace(other / "broker-coord.pem", cert)
        os.replace(other / "broker-coord.key", key)
        assert make(d, "coord", "192.168.4.10")["changed"]
        assert openssl("verify", "-CAfile", str(ca), str(cert)).returncode == 0

        # The broker's certificate ends no later than its CA.
        short = Path(tmp) / "short"
        make(short, "coord", days=100)
        make(short, "coord", "elsewhere", days=3650)
        ends = [openssl("x509", "-in", str(short / f), "-noout", "-enddate").stdout for f in ["ca.pem", "broker-coord.pem"]]
        assert ends[0] == ends[1], f"the broker's certificate outlives its CA: {ends}"

        # A CA certificate without its key: refused, naming both.
        (d / "ca.key").unlink()
        proc = make(d, "coord", check=False)
        assert proc.returncode != 0 and "ca.key does not" in proc.stderr, proc.stderr
    print("fleet_tls.py: backdated, named, idempotent, self-repairing: passed")


if __name__ == "__main__":
    main()
