#!/usr/bin/env python3
"""Opens a JWE the worker sealed (src/jwe.rs) with joserfc, an independent JOSE implementation.

Usage: python3 tests/jwe_interop.py PRIVATE_KEY_PEM_PATH JWE_COMPACT

Prints the plaintext, exactly (no newline added), and exits 0. Exits non-zero with the reason
on stderr when the token does not open, or when its header's `kid` is not the private key's
RFC 7638 thumbprint (computed by joserfc). Only RSA-OAEP-256 and ECDH-ES+A256KW with A256GCM
(RFC 7518) are allowed; joserfc does not allow RSA-OAEP-256 by default, so the algorithms are
named. Used by tests/worker/custody.rs. Needs `pip install joserfc==1.6.5`.
"""
import base64
import json
import sys

from joserfc import jwe
from joserfc.jwk import ECKey, RSAKey

ALGORITHMS = ["RSA-OAEP-256", "ECDH-ES+A256KW", "A256GCM"]


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    pem_path, value = sys.argv[1], sys.argv[2]
    with open(pem_path, "rb") as f:
        pem = f.read()
    encoded = value.split(".")[0]
    header = json.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    key_type = RSAKey if header.get("alg") == "RSA-OAEP-256" else ECKey
    key = key_type.import_key(pem)
    if header.get("kid") != key.thumbprint():
        sys.exit(f"kid {header.get('kid')!r} is not the key's thumbprint {key.thumbprint()!r}")
    opened = jwe.decrypt_compact(value, key, algorithms=ALGORITHMS)
    sys.stdout.buffer.write(opened.plaintext)


if __name__ == "__main__":
    main()
