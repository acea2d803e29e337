"""scripts/demo, which the README offers after either set-up command: it must run with only what
./scripts/proxy installs (no test extras such as boto3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo"
# Importing a module mapped to None raises ImportError: as if only the proxy's own install were there.
WITHOUT_TEST_EXTRAS = "import runpy, sys; sys.modules.update(boto3=None, awscli=None, pytest=None, hypothesis=None); runpy.run_path(sys.argv[1], run_name='__main__')"


def test_demo_runs_with_the_proxys_own_dependencies_and_shows_a_failover():
    done = subprocess.run([sys.executable, "-c", WITHOUT_TEST_EXTRAS, str(DEMO)], capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    throttled = done.stdout.split("us-east-1 now answers every request with 429 ThrottlingException:", 1)[1].split("stream:", 1)[0]
    regions = [line.split("region=", 1)[1].split()[0] for line in throttled.splitlines() if "region=" in line]
    assert len(regions) == 4 and "us-east-1" not in regions  # every request answered, from another region
    assert "status=429" in throttled  # the first of them was failed over from us-east-1
