"""Translation between the OpenAI Chat Completions and Anthropic Messages dialects.

Pure functions and small state machines, no I/O: a request document in one
dialect becomes a request document in the other, a response (JSON body,
stream event, error) comes back the same way.  ``plan.py`` is the one place
the proxy asks "does this attempt need translating, and how".

- ``chat_to_messages``: OpenAI Chat request -> Anthropic Messages request
- ``messages_to_chat``: Anthropic Messages request -> OpenAI Chat request
- ``bodies``: response bodies both ways (text, tool calls, stop reasons, usage)
- ``stream_to_chat`` / ``stream_to_messages``: SSE translators, event by event
- ``errors``: upstream error answers into the client's dialect
"""
