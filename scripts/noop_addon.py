"""The baseline for scripts/bench: a mitmproxy addon that does nothing but let event streams stream
(without ``stream``, mitmproxy would hold every answer until its end)."""


class Noop:
    def request(self, flow) -> None:
        pass

    def responseheaders(self, flow) -> None:
        if flow.response.headers.get("content-type", "").startswith("application/vnd.amazon.eventstream"):
            flow.response.stream = True


addons = [Noop()]
