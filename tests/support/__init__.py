"""Helpers shared by the test suites: service endpoints, Kafka produce/consume, polling."""
