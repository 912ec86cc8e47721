# Stand-in for vLLM (which needs GPUs), used only to test gpucluster's orchestration; not an inference engine.
"""The `vllm` console command: `vllm serve MODEL [flags]`, `vllm --version`."""
import argparse
import sys

from vllm.standin import KN, VERSION, main as serve_main


def main():
    argv = sys.argv[1:]
    if argv[:1] == ["--version"] or argv[:1] == ["-v"]:
        print(VERSION)
        return 0
    if not KN.get("serve_subcommand") or not argv or argv[0] != "serve":
        p = argparse.ArgumentParser(prog="vllm", description="vLLM CLI")
        p.add_argument("subcommand", choices=["serve"] if KN.get("serve_subcommand") else [])
        p.parse_args(argv[:1])
        return 2
    return serve_main(prog="vllm serve", argv=argv[1:], positional_model=True)


if __name__ == "__main__":
    sys.exit(main())
