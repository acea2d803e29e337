"""``bedrock-balancer [mitmdump options]``: mitmdump with the balancer loaded and safe defaults.

Defaults, each overridden by the same option given on the command line:

* listen on 127.0.0.1:8080 (mitmproxy itself listens on every interface);
* regular mode, so apps use it through ``HTTPS_PROXY``;
* the CA in ``certs/`` of a source checkout, or ``$XDG_DATA_HOME/bedrock-balancer/certs``
  (``~/.local/share/bedrock-balancer/certs``) for an installed copy; created on first run;
* ``connection_strategy=lazy``: the destination is chosen per request;
* ``flow_detail=0``: the balancer's own line per request replaces mitmdump's flow dump (``-v`` brings it back).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def default_confdir() -> Path:
    checkout = PACKAGE_DIR.parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "addons").is_dir():
        return checkout / "certs"
    data_home = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data_home / "bedrock-balancer" / "certs"


def _user_gave(args: list[str], option: str, *flags: str) -> bool:
    for i, arg in enumerate(args):
        if arg in flags or any(arg.startswith(f + "=") for f in flags):
            return True
        value = arg[len("--set="):] if arg.startswith("--set=") else (args[i + 1] if arg == "--set" and i + 1 < len(args) else "")
        if value.startswith(option + "="):
            return True
    return False


def default_args(args: list[str]) -> list[str]:
    defaults = ["--set", "connection_strategy=lazy"]
    if not _user_gave(args, "flow_detail", "--flow-detail", "-v", "-vv", "-vvv", "-q", "--quiet"):
        defaults += ["--set", "flow_detail=0"]  # the balancer logs one line per request itself
    if not _user_gave(args, "listen_host", "--listen-host"):
        defaults += ["--set", "listen_host=127.0.0.1"]
    if not _user_gave(args, "confdir"):
        confdir = default_confdir()
        confdir.mkdir(parents=True, exist_ok=True)
        defaults += ["--set", f"confdir={confdir}"]
    return defaults


def run_before_save(addons, count: int) -> None:
    """Move the last ``count`` addons of the chain to just before mitmproxy's ``save`` (``-w``), whose hooks write a
    flow as they end. Hooks run in chain order: only there does a flow saved when a stream fails carry what the
    balancer's ``error`` hook sets (the stream copy, the comment). The built-ins that edit requests (map_remote,
    map_local, modify_body, modify_headers, server replay) still run before the balancer, which sends the request
    as they leave it."""
    from mitmproxy.addons.save import Save

    chain = addons.chain
    ours = chain[-count:]
    del chain[-count:]
    at = next(i for i, addon in enumerate(chain) if isinstance(addon, Save))
    chain[at:at] = ours


def main(argv: list[str] | None = None) -> None:
    from mitmproxy.tools import cmdline, dump
    from mitmproxy.tools.main import run

    from .addon import BedrockBalancer
    from .contentview import BedrockViews

    class BalancerDumpMaster(dump.DumpMaster):
        def __init__(self, options, **kwargs):
            super().__init__(options, **kwargs)
            self.addons.add(BedrockBalancer(), BedrockViews())
            run_before_save(self.addons, 2)

    def extra(parsed):  # what mitmdump itself does with a trailing flow filter
        if getattr(parsed, "filter_args", None):
            text = " ".join(parsed.filter_args)
            return dict(save_stream_filter=text, readfile_filter=text, dumper_filter=text)
        return {}

    args = list(sys.argv[1:] if argv is None else argv)
    run(BalancerDumpMaster, cmdline.mitmdump, default_args(args) + args, extra)


if __name__ == "__main__":
    main()
