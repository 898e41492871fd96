"""Sample networks for tests, benchmarks and the README (not part of the installed package)."""
