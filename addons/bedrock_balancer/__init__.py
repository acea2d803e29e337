"""bedrock-balancer: spread Amazon Bedrock Runtime traffic over regions and accounts.

The decisions (classify, choose, rewrite and sign, account) live in plain modules that do not import
mitmproxy; :mod:`bedrock_balancer.addon` is the thin mitmproxy glue.
"""

__version__ = "0.1.0"
