"""An OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions) in front of tritonserver.

A thin translator, not a second engine: each request becomes one gRPC stream to the flover model.
`flover serve --openai-port` runs it as a child process (`server.openai_launcher`); `python -m flover_backend.frontends.openai`
runs it standalone. Importing this package imports nothing heavy.
"""
