# Stand-in for vLLM (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
"""python3 -m vllm.entrypoints.openai.api_server [flags]"""
import sys

from vllm.standin import main

if __name__ == "__main__":
    sys.exit(main(mode="api_server"))
