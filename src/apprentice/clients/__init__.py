"""Chat clients: the OpenAI-compatible teacher/student client with retries, rate limits and a response cache."""
