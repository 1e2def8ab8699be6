"""kvstacks-vllm: a vLLM KV connector backed by a kvstacks tier stack.

Importing this package does not import vLLM: ``kvstacks_vllm.connector`` does, and vLLM
imports that module itself when ``kv_connector_module_path`` names it.
"""
