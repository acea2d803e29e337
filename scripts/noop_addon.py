"""The baseline for scripts/bench: a mitmproxy addon that does nothing on each request."""


class Noop:
    def request(self, flow) -> None:
        pass


addons = [Noop()]
