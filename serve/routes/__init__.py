"""The HTTP API in routers: ``openai`` (completions, chat, models), ``adapters`` (load/unload), ``ops``."""
