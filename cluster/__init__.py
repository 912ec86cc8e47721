"""gpucluster: an LLM serving endpoint on bare-metal GPU hosts from a YAML inventory."""
__version__ = "0.1.0"
