"""The proxy's own AWS credentials, one source per (profile, role_arn), never blocking the event loop.

botocore resolves them (environment, shared files and profiles, SSO, container and instance roles) and,
for a ``role_arn``, assumes the role and refreshes it before it expires. botocore does that with
blocking I/O, so every resolution and refresh runs in a worker thread; requests use the cached frozen
credentials and only wait when there are none yet or they are about to expire. A refresh starts in the
background well before that point.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import botocore.session
from botocore.credentials import AssumeRoleCredentialFetcher, DeferredRefreshableCredentials

from . import sigv4

log = logging.getLogger(__name__)

# Refresh in the background when less than this is left; wait for a refresh when less than MANDATORY.
ADVISORY_REFRESH_S = 15 * 60
MANDATORY_REFRESH_S = 5 * 60


class CredentialsUnavailable(Exception):
    """No credentials could be found or refreshed for a target."""


class CredentialSource:
    def __init__(self, profile: str | None, role_arn: str | None, region: str):
        self.profile = profile
        self.role_arn = role_arn
        self.region = region
        self._botocore_credentials = None
        self._frozen: sigv4.Credentials | None = None
        self._expires_at: float | None = None  # epoch seconds; None for credentials that never expire
        self._refreshing: asyncio.Task | None = None

    def __str__(self) -> str:
        parts = [f"profile {self.profile}" if self.profile else "default credential chain"]
        if self.role_arn:
            parts.append(f"role {self.role_arn}")
        return ", ".join(parts)

    async def get(self) -> sigv4.Credentials:
        remaining = self._remaining()
        if self._frozen is not None and remaining > MANDATORY_REFRESH_S:
            if remaining < ADVISORY_REFRESH_S and self._refreshing is None:
                self._refreshing = asyncio.create_task(self._refresh())
            return self._frozen
        if self._refreshing is None:
            self._refreshing = asyncio.create_task(self._refresh())
        await asyncio.shield(self._refreshing)
        if self._frozen is None:
            hint = (
                "check the profile and the role; the warning before this one has botocore's error"
                if self.profile or self.role_arn
                else "set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, run `aws sso login`, or give the target a profile or role_arn"
            )
            raise CredentialsUnavailable(f"no AWS credentials for {self} ({hint})")
        return self._frozen

    def _remaining(self) -> float:
        return float("inf") if self._expires_at is None else self._expires_at - time.time()

    async def _refresh(self) -> None:
        try:
            frozen, expires_at = await asyncio.to_thread(self._resolve_blocking)
            self._frozen, self._expires_at = frozen, expires_at
        except Exception as e:  # botocore raises many kinds; the request gets a clear error either way
            # A warning, not an error: mitmdump exits on errors logged during start-up, and credentials
            # that are missing now (instance role not ready, SSO login pending) may be there later.
            log.warning("bedrock-balancer: cannot get AWS credentials (%s): %s", self, e)
        finally:
            self._refreshing = None

    def _resolve_blocking(self) -> tuple[sigv4.Credentials | None, float | None]:
        if self._botocore_credentials is None:
            self._botocore_credentials = self._create_blocking()
        if self._botocore_credentials is None:
            return None, None
        frozen = self._botocore_credentials.get_frozen_credentials()
        expiry = getattr(self._botocore_credentials, "_expiry_time", None)
        return (
            sigv4.Credentials(frozen.access_key, frozen.secret_key, frozen.token),
            expiry.timestamp() if expiry is not None else None,
        )

    def _create_blocking(self):
        session = botocore.session.Session(profile=self.profile)
        source = session.get_credentials()
        if source is None or self.role_arn is None:
            return source
        fetcher = AssumeRoleCredentialFetcher(
            # STS is called in the target's region (regional STS endpoints, no dependency on us-east-1).
            client_creator=functools.partial(session.create_client, region_name=self.region),
            source_credentials=source,
            role_arn=self.role_arn,
            extra_args={"RoleSessionName": "bedrock-balancer"},
        )
        return DeferredRefreshableCredentials(refresh_using=fetcher.fetch_credentials, method="assume-role")


class CredentialStore:
    """One :class:`CredentialSource` per distinct (profile, role_arn) among the targets."""

    def __init__(self, targets):
        self._sources: dict[tuple[str | None, str | None], CredentialSource] = {}
        for target in targets:
            if target.credentials_key not in self._sources:
                self._sources[target.credentials_key] = CredentialSource(target.profile, target.role_arn, target.region)

    def source(self, target) -> CredentialSource:
        return self._sources[target.credentials_key]

    async def get(self, target) -> sigv4.Credentials:
        return await self.source(target).get()

    async def warm_up(self) -> None:
        """Resolve every source once at start-up, so the first requests do not wait and problems show early."""
        results = await asyncio.gather(*(s.get() for s in self._sources.values()), return_exceptions=True)
        for source, result in zip(self._sources.values(), results):
            if isinstance(result, Exception):
                log.warning("bedrock-balancer: %s", result)
            else:
                # The key id's ends tell two accounts' keys apart, as the AWS console shows them; never the secret.
                log.info("bedrock-balancer: credentials ready: %s (key %s…%s)", source, result.access_key[:4], result.access_key[-4:])
