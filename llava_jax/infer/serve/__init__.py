"""`llava-jax serve`: an OpenAI-compatible chat server (FastAPI + uvicorn) over the batched engine.

    POST /v1/chat/completions   messages with text, `image_url` parts (data: URLs only) and `video_url` parts
                                (data: URLs; local files under --allow-local-media DIR),
                                max_tokens, temperature, top_p, seed, stop, stream (SSE)
    GET  /v1/models             the one model this server serves
    GET  /health

A request's path, one module per step:
  command.py    `serve_command`: checks the flags, binds the socket, loads the model, runs uvicorn
  app.py        the routes: reads the body (size-limited), hands it on, answers whole or streamed
  service.py    `ChatService.prepare`: body -> checked request -> prompt tokens and images; `submit`
                puts it on the batcher (request_batcher.py: one worker thread runs requests together)
    request.py  the body's schema (pydantic) and its parsing
    messages.py the messages -> conversation turns (data/conversation.py renders them), with images.py
                decoding each image from its data: URL (data_urls.py), videos.py each video
  output.py     the batcher's worker thread -> text deltas on the event loop (stop strings applied)
  responses.py  those deltas -> an OpenAI chat.completion, or chat.completion.chunk events

Request handling runs in three places: the event loop reads bodies and streams answers; a thread
pool parses, decodes images and tokenizes (CPU work that must not stall the loop); the batcher's
one worker thread owns the engine. Every user mistake is an `ApiError` (errors.py), answered with
a 4xx and OpenAI's error body `{"error": {"message", "type", "code", "param"}}`; `Limits`
(limits.py) bounds what one request may ask for.
"""
