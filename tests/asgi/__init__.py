"""ChatApp behind real ASGI servers (uvicorn, hypercorn), in the test process."""
