"""JSON from outside the device, parsed strictly: no duplicate keys, no NaN/Infinity.

Two parsers can disagree on a document with a repeated key (first or last wins?) and
NaN is not JSON at all, so bundles and cloud documents refuse both.
"""

import json


def loads_strict(data, what):
    """Parse ``data`` (bytes or text); ValueError naming ``what`` when it is not strict JSON."""
    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ValueError("the key %r appears twice" % key)
            seen[key] = value
        return seen

    def no_constant(name):
        raise ValueError("%s is not valid JSON" % name)

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError("%s is not valid JSON: %s" % (what, exc)) from None
