"""HTTP front end: OpenAI-compatible API, metrics, and `wallbreak serve`."""
