"""Checks the bunq emulator with bunq's own Python SDK as the client.

Usage: python sdk_check.py BASE_URL   (e.g. http://127.0.0.1:8089/v1)

The SDK creates an installation, registers a device and opens a session with an API key, as it
does against bunq (ApiContext.create); then the same key must be refused as spent, and a
credential the emulator rejects must fail with bunq's status and message.
"""
import sys
import uuid

from bunq.sdk.context.api_context import ApiContext
from bunq.sdk.context.api_environment_type import ApiEnvironmentType
from bunq.sdk.exception.bad_request_exception import BadRequestException

base = sys.argv[1].rstrip("/") + "/"
# The SDK knows only bunq's own hosts; point its sandbox entry at the emulator.
ApiEnvironmentType.SANDBOX._uri_base = base

key = "sandbox_sdk_check_" + uuid.uuid4().hex
ctx = ApiContext.create(ApiEnvironmentType.SANDBOX, key, "sdk check")
session = ctx.session_context
assert session is not None and len(session.token) == 64, "no session token"
assert session.user_id, "no user id"
print(f"session opened with bunq's Python SDK: user_id={session.user_id}")

for credential, expected in [(key, "Incorrect API key"), ("reject_" + uuid.uuid4().hex, "Incorrect API key")]:
    try:
        ApiContext.create(ApiEnvironmentType.SANDBOX, credential, "sdk check")
    except BadRequestException as e:
        assert expected in str(e), f"unexpected refusal: {e}"
        print(f"refused as bunq does: {str(e).splitlines()[0][:100]}")
    else:
        raise AssertionError("a spent or rejected credential opened a session")
