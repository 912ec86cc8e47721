# Stand-in for SGLang's `python3 -m sglang.launch_server` (gpucluster test rig); not an inference engine.
import sys

from sglang.standin import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
