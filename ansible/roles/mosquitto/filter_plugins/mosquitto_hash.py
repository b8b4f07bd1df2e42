"""Mosquitto password file entries, computed on the control machine.

``password | pifleet_mosquitto_hash(user)`` gives the ``$7$`` (PBKDF2-SHA512)
form that ``mosquitto_passwd`` writes, with a salt derived from the user and
password, so that the same credentials give the same line on every run and
Ansible reports no change.
"""

import base64
import hashlib

ITERATIONS = 101  # mosquitto_passwd's default
SALT_BYTES = 12


def pifleet_mosquitto_hash(password, user):
    salt = hashlib.sha256(("pifleet-mosquitto\0%s\0%s" % (user, password)).encode()).digest()[:SALT_BYTES]
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, ITERATIONS)
    return "$7$%d$%s$%s" % (
        ITERATIONS,
        base64.b64encode(salt).decode(),
        base64.b64encode(digest).decode(),
    )


class FilterModule:
    def filters(self):
        return {"pifleet_mosquitto_hash": pifleet_mosquitto_hash}
