"""The balancer's configuration: YAML (option ``bedrock_config``) or a region list (``bedrock_regions``).

Every problem is reported as :class:`ConfigError` naming the offending field
(``targets[1].region: ...``), and unknown keys are errors: a typo must not silently change routing.

Client authentication (``clients``: virtual SigV4 keys, ``api_keys``: Bedrock API keys) is configured
here too. A secret may be written in the file, or named by ``*_env`` (an environment variable) or
``*_file`` (a file, relative to the config file's directory); secrets never appear in a repr.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .classify import REGION, is_fips_host

STRATEGIES = ("quota", "round-robin", "least-outstanding", "priority", "latency")
DEFAULT_STRATEGY = "quota"

TOP_LEVEL_KEYS = {"strategy", "targets", "cross_geography", "timeouts", "retry", "quota_window_s", "affinity", "clients", "api_keys"}
TARGET_KEYS = {"region", "endpoint_url", "name", "weight", "profile", "role_arn", "models", "rpm", "tpm", "priority", "model_quotas"}
TIMEOUT_KEYS = {"connect_s", "read_s"}
RETRY_KEYS = {"max_attempts", "deadline_s", "stall_timeout_s", "cooldown_base_s", "cooldown_max_s"}
AFFINITY_KEYS = {"ttl_s", "max_keys"}
CLIENT_KEYS = {"name", "access_key_id", "secret_access_key", "secret_access_key_env", "secret_access_key_file", "rpm", "tpm"}
API_KEY_KEYS = {"name", "key", "key_env", "key_file", "rpm", "tpm"}
# Virtual access key ids travel in "Credential=<id>/<date>/...": no '/', ',', '=' or whitespace.
ACCESS_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{4,128}$")
MIN_SECRET_LENGTH = 16  # a client secret is all that stands between the network and the proxy's AWS credentials
# A target's name is sent in the x-bedrock-balancer-target and -attempts response headers
# ("target=NAME;region=...;status=..., target=..."): a control character breaks the response, and
# ';', ',' or '=' would make the attempts header ambiguous. Region names (the default names) qualify.
TARGET_NAME_SEPARATORS = ";,="


class ConfigError(ValueError):
    """A configuration problem; the message starts with the field it concerns."""


@dataclass(frozen=True)
class Target:
    """A place to send requests: a region, an endpoint there, and the credentials to sign with."""

    name: str
    region: str
    endpoint_url: str
    weight: int = 1
    profile: str | None = None
    role_arn: str | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    priority: int = 0
    model_quotas: tuple = ()  # ((pattern, Budget), ...)

    @property
    def scheme(self) -> str:
        return urlsplit(self.endpoint_url).scheme

    @property
    def host(self) -> str:
        return urlsplit(self.endpoint_url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.endpoint_url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def host_header(self) -> str:
        """The Host header (and signed ``host``) for this endpoint: the port only when not the default."""
        return urlsplit(self.endpoint_url).netloc.rpartition("@")[2]

    @property
    def fips(self) -> bool:
        """Whether the endpoint is a FIPS one: the only kind a request sent to a FIPS endpoint may go to."""
        return is_fips_host(self.host)

    @property
    def credentials_key(self) -> tuple[str | None, str | None]:
        return (self.profile, self.role_arn)

    def allows_model(self, model_id: str) -> bool:
        if self.models is None:
            return True
        resource = model_id.rpartition("/")[2]
        return any(fnmatch.fnmatchcase(model_id, p) or fnmatch.fnmatchcase(resource, p) for p in self.models)

    def __str__(self) -> str:
        return self.name if self.name == self.region else f"{self.name} ({self.region})"


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    # Bedrock can think for minutes before a non-streaming answer; botocore's own default is 60 s.
    read_s: float = 300.0


@dataclass(frozen=True)
class Retry:
    max_attempts: int = 4  # attempts in all, the first included
    # Bounds the time spent retrying and waiting for a cooled-down target, not a healthy answer in progress.
    deadline_s: float = 30.0
    stall_timeout_s: float = 20.0  # a stream with no first event by then is abandoned and failed over
    cooldown_base_s: float = 1.0
    cooldown_max_s: float = 60.0


@dataclass(frozen=True)
class Affinity:
    ttl_s: float = 900.0
    max_keys: int = 100_000


@dataclass(frozen=True)
class ClientKey:
    """A virtual SigV4 key pair: apps sign with it as if it were an AWS key; the proxy verifies."""

    name: str  # the client identity (access log field client_name, per-client limits)
    access_key_id: str
    secret_access_key: str = field(repr=False)


@dataclass(frozen=True)
class ApiKey:
    """A Bedrock API key (``Authorization: Bearer <key>``) the proxy accepts, and whose it is."""

    name: str
    key: str = field(repr=False)


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]
    strategy: str = DEFAULT_STRATEGY
    cross_geography: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: Retry = field(default_factory=Retry)
    quota_window_s: float = 60.0
    affinity: Affinity | None = None
    clients: tuple[ClientKey, ...] = ()
    api_keys: tuple[ApiKey, ...] = ()
    client_limits: tuple = ()  # ((client name, Budget), ...) for names that have rpm/tpm

    @property
    def has_budgets(self) -> bool:
        return any(t.rpm or t.tpm or t.model_quotas for t in self.targets)

    @property
    def authenticates_clients(self) -> bool:
        """Whether every client must authenticate (with a virtual key or an API key)."""
        return bool(self.clients or self.api_keys)

    def endpoints(self) -> set[tuple[str, str, int]]:
        return {(t.scheme, t.host.lower(), t.port) for t in self.targets}


def default_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://bedrock-runtime.{region}.{suffix}"


def load_file(path: str) -> Config:
    try:
        text = Path(path).expanduser().read_text()
    except OSError as e:
        raise ConfigError(f"bedrock_config: cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"bedrock_config: {path} is not valid YAML: {_yaml_problem(e)}") from None
    return parse(data, base_dir=Path(path).expanduser().resolve().parent)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what the YAML problem is, without PyYAML's quote of the file's text: the offending
    line may hold an inline secret."""
    if not isinstance(error, yaml.MarkedYAMLError):
        return str(error)  # a ReaderError: a bad character's code and position, no text
    mark = error.problem_mark or error.context_mark
    place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = error.problem or error.context or "syntax error"
    if error.context and error.problem:
        started = error.context_mark
        since = f" started at line {started.line + 1}, column {started.column + 1}" if started and started is not mark else ""
        problem += f" ({error.context}{since})"
    return place + problem


def from_regions(regions: str) -> Config:
    names = [r.strip() for r in regions.split(",") if r.strip()]
    if not names:
        raise ConfigError("bedrock_regions: give at least one region, e.g. us-east-1,us-west-2")
    for name in names:
        _check_region(name, "bedrock_regions", endpoint_given=False)
    return parse({"targets": [{"region": r} for r in dict.fromkeys(names)]})


def parse(data: object, base_dir: Path | None = None) -> Config:
    """``base_dir`` is where relative ``*_file`` paths are found (the config file's directory)."""
    if not isinstance(data, dict):
        raise ConfigError("bedrock_config: the file must hold a mapping with a 'targets' list")
    _reject_unknown(data, TOP_LEVEL_KEYS, "")
    strategy = data.get("strategy", DEFAULT_STRATEGY)
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    cross = data.get("cross_geography", False)
    if not isinstance(cross, bool):
        raise ConfigError("cross_geography: must be true or false")
    raw_targets = data.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise ConfigError("targets: give a non-empty list of targets")
    targets = _unique_names([_parse_target(t, f"targets[{i}]") for i, t in enumerate(raw_targets)], raw_targets)
    window = data.get("quota_window_s", 60)
    if isinstance(window, bool) or not isinstance(window, (int, float)) or window <= 0:
        raise ConfigError("quota_window_s: must be a positive number of seconds (60 = Bedrock's per-minute quotas)")
    return Config(
        targets=tuple(targets),
        strategy=strategy,
        cross_geography=cross,
        timeouts=Timeouts(**_numbers(data.get("timeouts", {}), TIMEOUT_KEYS, "timeouts")),
        retry=_parse_retry(data.get("retry", {})),
        quota_window_s=float(window),
        affinity=_parse_affinity(data.get("affinity", False)),
        **_parse_client_auth(data.get("clients", []), data.get("api_keys", []), base_dir or Path.cwd()),
    )


def _parse_target(data: object, where: str) -> Target:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping with at least 'region'")
    _reject_unknown(data, TARGET_KEYS, where)
    region = data.get("region")
    _check_region(region, f"{where}.region", endpoint_given="endpoint_url" in data)
    endpoint_url = _parse_endpoint(data.get("endpoint_url", default_endpoint(region)), f"{where}.endpoint_url")
    weight = data.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ConfigError(f"{where}.weight: must be a whole number of at least 1, not {weight!r}")
    models = data.get("models")
    if models is not None:
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"{where}.models: must be a non-empty list of model id patterns such as 'anthropic.*'")
        models = tuple(models)
    name = data.get("name", region)
    if not _is_target_name(name):
        raise ConfigError(
            f"{where}.name: {name!r} is not allowed; a target name must be printable ASCII without spaces, "
            "';', ',' or '=' (it is sent in the x-bedrock-balancer-target and -attempts response headers)"
        )
    for key in ("profile", "role_arn"):
        if key in data and (not isinstance(data[key], str) or not data[key]):
            raise ConfigError(f"{where}.{key}: must be a non-empty string")
    rpm, tpm = _limit(data, "rpm", where), _limit(data, "tpm", where)
    priority = data.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"{where}.priority: must be a whole number (lowest is used first)")
    model_quotas = _parse_model_quotas(data.get("model_quotas", {}), f"{where}.model_quotas")
    role_arn = data.get("role_arn")
    if role_arn is not None and not (role_arn.startswith("arn:") and ":role/" in role_arn):
        raise ConfigError(f"{where}.role_arn: {role_arn!r} is not an IAM role ARN")
    return Target(
        name=name,
        region=region,
        endpoint_url=endpoint_url,
        weight=weight,
        profile=data.get("profile"),
        role_arn=role_arn,
        models=models,
        rpm=rpm,
        tpm=tpm,
        priority=priority,
        model_quotas=model_quotas,
    )


def _is_target_name(name: object) -> bool:
    return isinstance(name, str) and bool(name) and all("!" <= c <= "~" and c not in TARGET_NAME_SEPARATORS for c in name)


@functools.cache
def _partitions() -> tuple[dict, ...]:
    """The partitions in botocore's bundled endpoints data: their names, regions and region patterns."""
    from botocore.loaders import create_loader

    return tuple(create_loader().load_data("endpoints")["partitions"])


@functools.cache
def known_regions() -> frozenset[str]:
    """Every region botocore knows, in every partition."""
    return frozenset(r for partition in _partitions() for r in partition.get("regions", {}))


@functools.cache
def partition_of(region: str) -> str:
    """The AWS partition of a region (``aws``, ``aws-cn``, ``aws-us-gov``, ...); ``aws`` for a region
    botocore does not know. Partitions have separate accounts and credentials, and a request must not
    leave its partition (China's data, for one, must stay in China)."""
    for partition in _partitions():
        if region in partition.get("regions", {}) or re.match(partition["regionRegex"], region):
            return partition["partition"]
    return "aws"


def _check_region(region: object, where: str, endpoint_given: bool) -> None:
    if not isinstance(region, str) or not REGION.match(region):
        raise ConfigError(f"{where}: {region!r} is not an AWS region name such as us-east-1")
    # A typo such as us-eest-1 must not silently become a target that never answers. A region newer
    # than the installed botocore is accepted when the target names its endpoint_url explicitly.
    if not endpoint_given and region not in known_regions():
        close = _closest(region, known_regions())
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise ConfigError(f"{where}: {region!r} is not a region botocore knows{hint}; give endpoint_url to use it anyway")


def _closest(word: str, candidates) -> list[str]:
    """The candidates fewest typos away from ``word`` (at most two), all of them if several tie."""
    distances = {candidate: _typos(word, candidate) for candidate in candidates}
    fewest = min(distances.values(), default=3)
    return sorted(c for c, d in distances.items() if d == fewest) if fewest <= 2 else []


def _typos(a: str, b: str) -> int:
    """Edits from ``a`` to ``b``, a swap of neighbours counting as one (optimal string alignment distance)."""
    rows = [list(range(len(b) + 1))]
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            row.append(min(rows[-1][j] + 1, row[j - 1] + 1, rows[-1][j - 1] + (x != y)))
            if i > 1 and j > 1 and x == b[j - 2] and a[i - 2] == y:
                row[j] = min(row[j], rows[-2][j - 2] + 1)
        rows.append(row)
    return rows[-1][-1]


def _parse_endpoint(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a URL such as https://bedrock-runtime.us-east-1.amazonaws.com")
    shown = redacted_url(value)  # the URL may carry a password: never echo it
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: {shown!r} must be an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise ConfigError(f"{where}: {shown!r} must not carry user info (user:password@): requests to Bedrock are signed with SigV4")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: {shown!r} must have no path, query or fragment")
    try:
        parts.port
    except ValueError:
        raise ConfigError(f"{where}: {shown!r} has an invalid port") from None
    return f"{parts.scheme}://{parts.netloc}"


def redacted_url(url: str) -> str:
    """The URL with its password (``user:password@``) replaced by ``***``, for logs and error messages.

    Masks up to the last '@', so a password with an unescaped '/' or '@', or a URL without its
    scheme, is still hidden."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    user, colon, _password = userinfo.partition(":")
    if not (at and colon):
        return url
    return f"{scheme}{sep}{user}:***@{host}"


def _numbers(data: object, allowed: set[str], where: str) -> dict[str, float]:
    """A mapping of positive numbers, e.g. ``timeouts`` or ``retry``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping")
    _reject_unknown(data, allowed, where)
    values = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{where}.{key}: must be a positive number")
        values[key] = float(value)
    return values


def _parse_retry(data: object) -> Retry:
    values = _numbers(data, RETRY_KEYS, "retry")
    if "max_attempts" in values:
        if values["max_attempts"] != int(values["max_attempts"]):
            raise ConfigError("retry.max_attempts: must be a whole number (attempts in all, the first included)")
        values["max_attempts"] = int(values["max_attempts"])
    return Retry(**values)


def _parse_affinity(data: object) -> Affinity | None:
    if data is False or data is None:
        return None
    if data is True:
        return Affinity()
    values = _numbers(data, AFFINITY_KEYS, "affinity")
    if "max_keys" in values:
        values["max_keys"] = int(values["max_keys"])
    return Affinity(**values)


def _limit(data: dict, key: str, where: str) -> int | None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{where}.{key}: must be a whole number of at least 1 (per quota window)")
    return value


def _parse_model_quotas(data: object, where: str) -> tuple:
    from .quota import Budget

    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must map model id patterns to {{rpm, tpm}}")
    quotas = []
    for pattern, limits in data.items():
        if not isinstance(pattern, str) or not pattern or not isinstance(limits, dict) or not limits:
            raise ConfigError(f"{where}: must map model id patterns to {{rpm, tpm}}")
        _reject_unknown(limits, {"rpm", "tpm"}, f"{where}.{pattern}")
        quotas.append((pattern, Budget(_limit(limits, "rpm", f"{where}.{pattern}"), _limit(limits, "tpm", f"{where}.{pattern}"))))
    return tuple(quotas)


def _reject_unknown(data: dict, allowed: set[str], where: str) -> None:
    for key in data:
        if key not in allowed:
            place = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{place}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _unique_names(targets: list[Target], raw_targets: list[dict]) -> list[Target]:
    """Targets without an explicit name are named after their region, a repeat with a suffix (-2, -3)."""
    explicit: set[str] = set()
    for i, raw in enumerate(raw_targets):
        if "name" in raw:
            if raw["name"] in explicit:
                raise ConfigError(f"targets[{i}].name: {raw['name']!r} names two targets; names must be unique")
            explicit.add(raw["name"])
    taken = set(explicit)
    result = []
    for target, raw in zip(targets, raw_targets):
        if "name" not in raw:
            name, n = target.name, 1
            while name in taken:
                n += 1
                name = f"{target.name}-{n}"
            target = Target(**{**target.__dict__, "name": name})
        taken.add(target.name)
        result.append(target)
    return result


# -- client authentication -----------------------------------------------------------------------


def _parse_client_auth(raw_clients: object, raw_api_keys: object, base_dir: Path) -> dict:
    for key, value in (("clients", raw_clients), ("api_keys", raw_api_keys)):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list of mappings")
    clients, api_keys, limits = [], [], {}
    limit_given_at: dict[str, str] = {}
    for i, raw in enumerate(raw_clients):
        where = f"clients[{i}]"
        name = _entry_name(raw, CLIENT_KEYS, where)
        access_key_id = raw.get("access_key_id")
        if not isinstance(access_key_id, str) or not ACCESS_KEY_ID.match(access_key_id):
            raise ConfigError(
                f"{where}.access_key_id: must be 4 to 128 letters, digits, '.', '_' or '-' (what the app uses as its "
                "AWS access key id)"
            )
        secret = _secret(raw, "secret_access_key", where, base_dir)
        clients.append(ClientKey(name, access_key_id, secret))
        _collect_limit(raw, name, where, limits, limit_given_at)
    for i, raw in enumerate(raw_api_keys):
        where = f"api_keys[{i}]"
        name = _entry_name(raw, API_KEY_KEYS, where)
        key = _secret(raw, "key", where, base_dir)
        if any(c.isspace() for c in key):
            raise ConfigError(f"{where}.key: must not contain whitespace")
        api_keys.append(ApiKey(name, key))
        _collect_limit(raw, name, where, limits, limit_given_at)
    _unique([c.access_key_id for c in clients], "clients", "access_key_id")
    _unique([k.key for k in api_keys], "api_keys", "key", show=False)
    return {"clients": tuple(clients), "api_keys": tuple(api_keys), "client_limits": tuple(limits.items())}


def _entry_name(raw: object, allowed: set[str], where: str) -> str:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping with at least 'name'")
    _reject_unknown(raw, allowed, where)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip() or any(not c.isprintable() for c in name):
        raise ConfigError(f"{where}.name: must be a non-empty printable string (the client's identity in logs)")
    return name


def _secret(raw: dict, key: str, where: str, base_dir: Path) -> str:
    """The secret given inline (``key``), by environment variable (``key_env``) or by file (``key_file``)."""
    given = [k for k in (key, f"{key}_env", f"{key}_file") if k in raw]
    if len(given) != 1:
        problem = "missing" if not given else f"given {len(given)} ways ({', '.join(given)})"
        raise ConfigError(f"{where}.{key}: {problem}; give exactly one of {key}, {key}_env (an environment variable) or {key}_file (a file)")
    source = given[0]
    value = raw[source]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{source}: must be a non-empty string")
    if source.endswith("_env"):
        secret = os.environ.get(value)
        if secret is None:
            raise ConfigError(f"{where}.{source}: environment variable {value} is not set")
    elif source.endswith("_file"):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        try:
            secret = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{where}.{source}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    else:
        secret = value
    secret = secret.strip()
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{where}.{source}: the secret must be at least {MIN_SECRET_LENGTH} characters long")
    return secret


def _collect_limit(raw: dict, name: str, where: str, limits: dict, given_at: dict) -> None:
    from .quota import Budget

    rpm, tpm = _limit(raw, "rpm", where), _limit(raw, "tpm", where)
    if rpm is None and tpm is None:
        return
    if name in given_at:
        raise ConfigError(f"{where}.rpm: limits for client {name!r} are already given in {given_at[name]}; give them once per name")
    given_at[name] = where
    limits[name] = Budget(rpm, tpm)


def _unique(values: list[str], where: str, key: str, show: bool = True) -> None:
    seen: set[str] = set()
    for i, value in enumerate(values):
        if value in seen:
            what = repr(value) if show else "this value"
            raise ConfigError(f"{where}[{i}].{key}: {what} appears twice; each must be unique")
        seen.add(value)
