"""Tools for trying and measuring the orchestrator: a local broker, the demo, the bench."""
