"""Sample networks and the bundled sample model, for tests, benchmarks and the README (``onnxcc.models``)."""
