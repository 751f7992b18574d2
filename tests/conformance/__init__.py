"""The adapter conformance suite: docs/protocol.md checked over the wire against real servers."""
