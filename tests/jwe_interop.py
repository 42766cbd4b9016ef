#!/usr/bin/env python3
"""Opens a JWE the worker sealed, with joserfc (an independent JOSE implementation).

Usage: jwe_interop.py PRIVATE_KEY_PEM_PATH JWE_COMPACT
Prints the plaintext. Used by the worker's tests (tests/worker/custody.rs) to prove that what
the worker seals, a consumer's common library opens: RSA-OAEP-256 and ECDH-ES+A256KW with
A256GCM (RFC 7516/7518). Needs `pip install joserfc`.
"""
import base64
import json
import sys

from joserfc import jwe
from joserfc.jwk import ECKey, RSAKey

ALGORITHMS = ["RSA-OAEP-256", "ECDH-ES+A256KW", "A256GCM"]


def main() -> None:
    pem_path, value = sys.argv[1], sys.argv[2]
    pem = open(pem_path, "rb").read()
    header = value.split(".")[0]
    kind = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["alg"]
    key = RSAKey.import_key(pem) if kind.startswith("RSA") else ECKey.import_key(pem)
    opened = jwe.decrypt_compact(value, key, algorithms=ALGORITHMS)
    sys.stdout.write(opened.plaintext.decode())


if __name__ == "__main__":
    main()
