"""The incremental path: the backend choice (kernels, engine, CUDA graphs), the engines that run the backbone
over a static KV cache, the scheduler that keeps the books of each row's segments, and the request loop behind
``generate``, ``ingest`` and the server.  Stands on core and native; it drives a model through the methods the
scheduler calls on it, never by importing it.
"""
