#!/usr/bin/env python3
"""The fleet CA and a broker's certificate, made on the control machine.

    fleet_tls.py --dir DIR --broker NAME --san NAME_OR_IP... [--days N] [--not-before YYYY-MM-DD]

Makes DIR/ca.key and DIR/ca.pem once (later runs reuse them), and
DIR/broker-NAME.key and DIR/broker-NAME.pem, signed by the CA, for the given
names and addresses. The broker's pair is made again when it is missing,
when its names differ, when the CA did not sign it, when its key does not
match it, when it starts later than --not-before or expires within 30 days.

Both are valid from --not-before (default 2020-01-01), not from the
controller's clock: a Pi without a battery-backed clock can start days or
months behind, and would refuse a certificate that is not valid yet. (A CA
made before, by openssl, is kept: it starts when it was made, which
pifleet's daemons do not check of a CA, but OpenSSL clients such as
mosquitto_sub do. Delete ca.pem and ca.key to have a backdated one.) The
broker's certificate never outlives the CA; a CA within 30 days of its end
is refused with what to do.

Every file is written under a temporary name and renamed: an interrupted
run leaves the old file or the new one, never half of one; a key left
beside a certificate it does not match is found by the next run and
replaced. Prints one JSON line: {"changed": bool, "made": [files]}.
Needs Python's `cryptography` (a dependency of ansible-core).
"""

import argparse
import datetime
import ipaddress
import json
import os
import sys
import tempfile

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError:
    sys.exit("fleet_tls.py: needs the Python package `cryptography` in the Python that runs "
             "ansible-playbook (pip install cryptography, or apt install python3-cryptography)")

RENEW_BEFORE = datetime.timedelta(days=30)


def write(path, data, mode):
    """Writes `data` to `path` under a temporary name, then renames it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def new_key():
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def general_name(name):
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def certificate(subject, issuer, public_key, signing_key, not_before, not_after, extensions):
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer)
               .public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def ca(directory, not_before, days, made):
    """The fleet CA's key and certificate: read, or made once."""
    key_path, cert_path = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    key_bytes, cert_bytes = read(key_path), read(cert_path)
    if cert_bytes is not None:
        if key_bytes is None:
            sys.exit(f"fleet_tls.py: {cert_path} exists but {key_path} does not: restore the CA's key, "
                     "or delete both to make a new CA (every daemon then needs the new ca.pem)")
        return serialization.load_pem_private_key(key_bytes, None), x509.load_pem_x509_certificate(cert_bytes)
    # A key without a certificate: an interrupted first run; start again.
    key = new_key()
    name = "pifleet fleet CA"
    cert = certificate(name, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), key,
                       not_before, days_from_now(days), [
                           (x509.BasicConstraints(ca=True, path_length=0), True),
                           (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), True),
                           (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),
                       ])
    # The key first: a certificate on disk always has its key.
    write(key_path, key_pem(key), 0o600)
    write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    made += [key_path, cert_path]
    return key, cert


def broker_is_current(key_bytes, cert_bytes, ca_cert, names, not_before):
    """Whether the broker's pair on disk can stay."""
    if key_bytes is None or cert_bytes is None:
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_bytes)
        key = serialization.load_pem_private_key(key_bytes, None)
        # (verify_directly_issued_by needs cryptography 40; Debian 12 has 38.)
        ca_cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                    ec.ECDSA(cert.signature_hash_algorithm))
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    same_key = (key.public_key().public_bytes(serialization.Encoding.DER, public)
                == cert.public_key().public_bytes(serialization.Encoding.DER, public))
    now = datetime.datetime.now(datetime.timezone.utc)
    return (same_key and have == {general_name(n) for n in names}
            and utc(cert, "not_valid_before") <= not_before and utc(cert, "not_valid_after") - RENEW_BEFORE > now)


def days_from_now(days):
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)


def utc(cert, field):
    """A validity bound as an aware datetime (the `_utc` fields need
    cryptography 42; before, the naive fields are UTC)."""
    aware = getattr(cert, field + "_utc", None)
    return aware if aware is not None else getattr(cert, field).replace(tzinfo=datetime.timezone.utc)


def broker(directory, name, names, ca_key, ca_cert, not_before, days, made):
    key_path = os.path.join(directory, f"broker-{name}.key")
    cert_path = os.path.join(directory, f"broker-{name}.pem")
    if broker_is_current(read(key_path), read(cert_path), ca_cert, names, not_before):
        return
    ca_ends = utc(ca_cert, "not_valid_after")
    if ca_ends - RENEW_BEFORE <= datetime.datetime.now(datetime.timezone.utc):
        sys.exit(f"fleet_tls.py: the fleet CA in {directory} ends on {ca_ends:%Y-%m-%d}: delete ca.pem and "
                 "ca.key there to make a new one (every daemon then gets the new ca.pem from the playbook)")
    key = new_key()
    # (Not beyond the CA's own end.)
    cert = certificate(name, ca_cert.subject, key.public_key(), ca_key, not_before,
                       min(days_from_now(days), ca_ends), [
        (x509.SubjectAlternativeName([general_name(n) for n in names]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])
    write(key_path, key_pem(key), 0o600)
    write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    made += [key_path, cert_path]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--broker", required=True, help="the broker's inventory name (file names, CN)")
    parser.add_argument("--san", action="append", required=True, help="a name or address it serves")
    parser.add_argument("--days", type=int, default=3650)
    parser.add_argument("--not-before", default="2020-01-01")
    args = parser.parse_args()
    try:
        not_before = datetime.datetime.strptime(args.not_before, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        sys.exit(f"fleet_tls.py: --not-before {args.not_before!r} is not a date YYYY-MM-DD")
    if args.days < 60:
        sys.exit(f"fleet_tls.py: --days {args.days}: at least 60 (certificates are renewed 30 days before)")
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    made = []
    ca_key, ca_cert = ca(args.dir, not_before, args.days, made)
    broker(args.dir, args.broker, args.san, ca_key, ca_cert, not_before, args.days, made)
    print(json.dumps({"changed": bool(made), "made": made}))


if __name__ == "__main__":
    main()
