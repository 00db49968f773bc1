"""The OpenAI-compatible gateway: HTTP in front of the network's job and result streams.

`openai` translates between OpenAI's request and response shapes and the network's job and
result bodies (pure functions); `app` serves them over HTTP (Starlette on uvicorn, the
optional `gateway` extra) and talks to NATS as `worker.client` does.
"""
