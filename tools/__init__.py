"""Command-line tools: phantom data, converter, benchmarks, local GCS emulator."""
