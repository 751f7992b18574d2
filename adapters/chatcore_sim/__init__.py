"""Deterministic chat simulation: test chat behaviour without sockets or sleeps.

>>> sim = Simulation(seed=1)
>>> alice = sim.connect("alice", room="general")
>>> bob = sim.connect("bob", room="general")
>>> alice.send("hi")
>>> bob.texts()
['hi']
"""

from ._cluster import Bus, Cluster, Faults, Node
from ._sim import START, SimClient, Simulation

__all__ = ["START", "Bus", "Cluster", "Faults", "Node", "SimClient", "Simulation"]
