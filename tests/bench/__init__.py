"""The benchmark suite: ``python -m tests.bench [--quick] [--json PATH] [--only NAMES] [--repeat N]
[--set NAME=VALUE ...]``.

Starts its own Kafka and redis-server (devstack), runs the raw-consumer, stock-dramatiq and
naive-loop baselines, the bridge scenarios T1-T7 and P1-P7 against real processes, and writes
every repetition, the medians and the target rows to JSON.
"""
