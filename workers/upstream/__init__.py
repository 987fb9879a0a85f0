"""A Fareway worker in front of an engine a team already runs, over its OpenAI-compatible HTTP API
(vLLM, SGLang, TGI, llama.cpp's server, Ollama, `transformers serve`): it serves the WorkerService,
registers and heartbeats like a native worker, and meters device time by what it observes
(meter.py)."""
