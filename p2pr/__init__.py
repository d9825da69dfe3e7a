"""p2pr: the application: command line, launchers, benchmarks, chaos, the OpenAI-compatible server."""
