"""mitmproxy script entry: ``mitmweb -s addons/balancer.py --set bedrock_config=config.yaml``.

mitmproxy does not register ``-s`` scripts in ``sys.modules``, so the real code lives in the importable
package ``bedrock_balancer`` beside this file; mitmproxy puts this directory on ``sys.path`` while it
loads the script, so this works from a source checkout as well as from an installed copy.
"""

from bedrock_balancer.addon import BedrockBalancer
from bedrock_balancer.contentview import BedrockViews

addons = [BedrockBalancer(), BedrockViews()]
