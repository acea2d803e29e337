"""An emulator of Amazon Bedrock Runtime for tests, the README demo and benchmarks.

It judges requests as AWS does (SigV4 recomputed from the raw request, credential scope, clock
skew, temporary credentials from its own STS, Bedrock API keys, model identifier rules per region)
and answers in Bedrock's wire format, including event streams. Faults (throttling, 5xx, dropped
connections, stalls, exceptions inside streams, cut streams), quotas and stream holds are switched
from Python or through the ``/_emulator/`` control API::

    from bedrock_balancer.emulator import Emulator

    with Emulator(regions=["us-east-1", "eu-west-1"], credentials={"AKID": "secret"}) as emu:
        client = boto3.client("bedrock-runtime", region_name="us-east-1",
                              endpoint_url=emu.endpoint_url("us-east-1"), verify=emu.ca_path, ...)

Modules: :mod:`.server` (the :class:`Emulator` and its request pipeline), :mod:`.httpserver`
(asyncio + h11), :mod:`.sigv4check` (the independent signature check), :mod:`.models` (model
identifier rules, token estimates), :mod:`.responses` (wire formats), :mod:`.quota`, :mod:`.sts`,
:mod:`.tlsutil` (test CA), :mod:`.cli` (``bedrock-emulator``).
"""

from .server import (
    DEMO_ACCESS_KEY_ID,
    DEMO_SECRET_ACCESS_KEY,
    MODES,
    Emulator,
    HoldHandle,
    RecordedRequest,
)

__all__ = [
    "DEMO_ACCESS_KEY_ID",
    "DEMO_SECRET_ACCESS_KEY",
    "MODES",
    "Emulator",
    "HoldHandle",
    "RecordedRequest",
]
