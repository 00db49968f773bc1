"""Helpers shared by the tests: fake runtimes, the network side of a job, polling, Settings."""
