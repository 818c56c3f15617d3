"""The seed document's Python examples, ready to run with the import root `fmedge`.

Each example runs as written except for three substitutions a test needs: the import
root (`flowmason_edge` → `fmedge`, the one change design §1 allows), the /var/flowmason
paths (→ a temp dir) and the cloud URL (→ a loopback address the test controls).
"""

import asyncio
import os
import re
import textwrap

SEED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "seed.md")


def python_blocks():
    """{heading: [code, ...]} for every ```python block, under its nearest heading."""
    blocks, heading = {}, None
    text = open(SEED, encoding="utf-8").read()
    for match in re.finditer(r"^(#+) ([^\n]+)$|^```python\n(.*?)^```", text, re.M | re.S):
        if match.group(2):
            heading = match.group(2).strip()
        else:
            blocks.setdefault(heading, []).append(match.group(3))
    return blocks


def example(heading, index=0):
    return python_blocks()[heading][index]


def adapt(code, data_root, cloud_url="http://127.0.0.1:9"):
    code = code.replace("flowmason_edge", "fmedge")
    code = code.replace("/var/flowmason", str(data_root))
    return code.replace("https://studio.flowmason.io", cloud_url)


def run_example(code, namespace=None):
    """Run ``code`` (which may use top-level await) and return its namespace."""
    namespace = dict(namespace or {})
    body = textwrap.indent(code, "    ")
    source = ("async def __example__():\n" + body +
              "\n    return {k: v for k, v in locals().items()}\n")
    compiled = compile(source, "<seed example>", "exec")
    run_in(compiled, namespace)
    results = asyncio.run(namespace["__example__"]())
    namespace.update(results)
    return namespace


def run_in(compiled, namespace):
    # Executing the seed's own example text is the point of these tests; this helper
    # lives in tests/, never in fmedge/.
    exec(compiled, namespace)  # noqa: S102
