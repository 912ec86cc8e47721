# Stand-in for vLLM (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
"""The `vllm` console command (only for releases whose wheel has one): the release's own CLI parses the
command line (`vllm serve MODEL [flags]`, `vllm --version`, errors); `serve` then runs the stand-in."""
import sys

from vllm.standin import main as standin_main


def main():
    return standin_main(mode="cli", argv=sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
