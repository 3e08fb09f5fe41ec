"""Talking to LLM servers: transport, rate limits, retries, the durable request store."""
