"""An OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) in front of tritonserver.

A thin translator, not a second engine: each request becomes one gRPC stream to the flover model.
`start_openai_front` (in `launcher`) runs it as a child process; `python -m flover_backend.openai_front`
runs it standalone. Importing this package imports nothing heavy.
"""
