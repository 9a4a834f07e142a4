"""job-orchestrator: the Kafka-native single source of truth for job runs."""

from worker import compiled

compiled.install()
