# Stand-in for SGLang (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
__version__ = "0.5.15"
