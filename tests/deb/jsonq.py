#!/usr/bin/python3
"""Evaluate a Python expression on JSON from stdin, for tests/deb/run-test.sh:

    dtsctl -o json status | python3 jsonq.py 'd["nodes"][0]["node_id"]'

`d` is the document. A string result is printed as is, anything else as JSON. A result of
False or None exits 1, so a comparison works as a condition.
"""
import json
import sys

d = json.load(sys.stdin)
result = eval(sys.argv[1], {"d": d})
print(result if isinstance(result, str) else json.dumps(result))
sys.exit(1 if result is False or result is None else 0)
