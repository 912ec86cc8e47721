# Stand-in for vLLM (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
