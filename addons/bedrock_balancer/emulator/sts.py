"""Just enough of AWS STS (query protocol) to hand out temporary credentials.

``AssumeRole`` issues an ``ASIA...`` key, a secret and a session token that the emulator then
accepts for Bedrock, but only together with a matching, signed ``X-Amz-Security-Token`` and only
until they expire: that is how a proxy's handling of temporary credentials gets tested.
``GetCallerIdentity`` answers who signed the request.

Errors use the query protocol's XML envelope and STS's own codes: a signature problem is
``SignatureDoesNotMatch`` there, an unknown key ``InvalidClientTokenId``.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import string
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

from .responses import ACCOUNT_ID, HttpAnswer, http_date
from .sigv4check import CredentialRecord

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"
XML_CONTENT_TYPE = "text/xml"

# Bedrock-style auth error -> (STS error code, HTTP status).
STS_AUTH_ERRORS = {
    "MissingAuthenticationTokenException": ("MissingAuthenticationToken", 403),
    "IncompleteSignatureException": ("IncompleteSignature", 400),
    "InvalidSignatureException": ("SignatureDoesNotMatch", 403),
    "UnrecognizedClientException": ("InvalidClientTokenId", 403),
    "ExpiredTokenException": ("ExpiredToken", 400),
}

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::(\d{12}):role/(?:[\w+=,.@-]+/)*([\w+=,.@-]{1,64})$")
_SESSION_NAME = re.compile(r"^[\w+=,.@-]{2,64}$")
_KEY_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"


class StsError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def is_sts_request(method: str, raw_path: bytes, content_type: str | None) -> bool:
    return (
        method == "POST"
        and raw_path == b"/"
        and (content_type or "").split(";")[0].strip().lower() == "application/x-www-form-urlencoded"
    )


def parse_form(body: bytes) -> dict[str, str]:
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


def xml_answer(status: int, xml: str, request_id: str, region: str) -> HttpAnswer:
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n' + xml).encode("utf-8")
    headers = [
        ("Date", http_date()),
        ("x-amzn-RequestId", request_id),
        ("x-emulator-region", region),
        ("Content-Type", XML_CONTENT_TYPE),
        ("Content-Length", str(len(body))),
    ]
    return HttpAnswer(status, headers, body)


def error_xml(code: str, message: str, request_id: str) -> str:
    return (
        f'<ErrorResponse xmlns="{STS_NAMESPACE}">\n'
        f"  <Error>\n    <Type>Sender</Type>\n    <Code>{escape(code)}</Code>\n"
        f"    <Message>{escape(message)}</Message>\n  </Error>\n"
        f"  <RequestId>{request_id}</RequestId>\n</ErrorResponse>\n"
    )


def _random_text(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


def issue_temporary_credentials(duration_s: int, now: dt.datetime) -> CredentialRecord:
    return CredentialRecord(
        access_key_id="ASIA" + _random_text(_KEY_ALPHABET, 16),
        secret_access_key=_random_text(_SECRET_ALPHABET, 40),
        session_token="IQoJb3JpZ2luX2VjE" + _random_text(_SECRET_ALPHABET, 300),
        expires_at=now.replace(microsecond=0) + dt.timedelta(seconds=duration_s),
    )


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def assume_role(form: dict[str, str], now: dt.datetime) -> tuple[CredentialRecord, str]:
    """Validate an AssumeRole call; return the new credentials and the result XML."""
    role_arn = form.get("RoleArn")
    session_name = form.get("RoleSessionName")
    if not role_arn or not session_name:
        missing = "RoleArn" if not role_arn else "RoleSessionName"
        raise StsError("MissingParameter", f"The request must contain the parameter {missing}")
    match = _ROLE_ARN.match(role_arn)
    if not match:
        raise StsError("ValidationError", f"{role_arn} is invalid")
    if not _SESSION_NAME.match(session_name):
        raise StsError(
            "ValidationError",
            "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint",
        )
    try:
        duration_s = int(form.get("DurationSeconds", "3600"))
    except ValueError:
        raise StsError("ValidationError", "DurationSeconds must be an integer") from None
    if not 900 <= duration_s <= 43200:
        raise StsError(
            "ValidationError",
            "1 validation error detected: Value at 'durationSeconds' failed to satisfy constraint: "
            "Member must have value between 900 and 43200",
        )
    account, role_name = match.groups()
    record = issue_temporary_credentials(duration_s, now)
    role_id = "AROA" + _random_text(_KEY_ALPHABET, 17)
    xml = (
        f'<AssumeRoleResponse xmlns="{STS_NAMESPACE}">\n  <AssumeRoleResult>\n'
        f"    <AssumedRoleUser>\n      <AssumedRoleId>{role_id}:{escape(session_name)}</AssumedRoleId>\n"
        f"      <Arn>arn:aws:sts::{account}:assumed-role/{escape(role_name)}/{escape(session_name)}</Arn>\n"
        f"    </AssumedRoleUser>\n    <Credentials>\n"
        f"      <AccessKeyId>{record.access_key_id}</AccessKeyId>\n"
        f"      <SecretAccessKey>{record.secret_access_key}</SecretAccessKey>\n"
        f"      <SessionToken>{record.session_token}</SessionToken>\n"
        f"      <Expiration>{_iso(record.expires_at)}</Expiration>\n"
        f"    </Credentials>\n  </AssumeRoleResult>\n"
    )
    return record, xml


def get_caller_identity_xml(access_key_id: str, temporary: bool) -> str:
    if temporary:
        user_id = f"AROAEMULATOR:{access_key_id}"
        arn = f"arn:aws:sts::{ACCOUNT_ID}:assumed-role/emulator-role/{access_key_id}"
    else:
        user_id = "AIDAEMULATOR" + access_key_id[-8:]
        arn = f"arn:aws:iam::{ACCOUNT_ID}:user/{access_key_id}"
    return (
        f'<GetCallerIdentityResponse xmlns="{STS_NAMESPACE}">\n  <GetCallerIdentityResult>\n'
        f"    <Arn>{escape(arn)}</Arn>\n    <UserId>{escape(user_id)}</UserId>\n"
        f"    <Account>{ACCOUNT_ID}</Account>\n  </GetCallerIdentityResult>\n"
    )


def close_result(xml: str, action: str, request_id: str) -> str:
    """Append the ResponseMetadata every query-protocol answer ends with."""
    return (
        xml
        + f"  <ResponseMetadata>\n    <RequestId>{request_id}</RequestId>\n  </ResponseMetadata>\n"
        + f"</{action}Response>\n"
    )
