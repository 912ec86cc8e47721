# Stand-in for torch inside the rig's vLLM stand-in images (no real GPU exists); answers version/arch questions only.
import json as _json
import os as _os

with open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "standin_build.json")) as _f:
    _BUILD = _json.load(_f)

__version__ = "%s+cu%s" % (_BUILD["torch"], _BUILD["cuda"].replace(".", ""))

from torch import cuda, version  # noqa: E402,F401
