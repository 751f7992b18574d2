"""chatcore's benchmarks: fan-out against websockets, picows and python-socketio.

Run ``python3 dev.py bench`` (full, under 15 minutes) or ``python3 dev.py bench
--short`` (CI, about a minute). ``benchmarks/README.md`` has the latest table.
"""
