"""Deterministic chat simulation: test chat behaviour without sockets or sleeps.

>>> sim = Simulation(seed=1)
>>> alice = sim.connect("alice", room="general")
>>> bob = sim.connect("bob", room="general")
>>> alice.send("hi")
>>> bob.texts()
['hi']
"""

from ._sim import START, SimClient, Simulation

__all__ = ["START", "SimClient", "Simulation"]
