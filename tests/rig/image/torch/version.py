# Stand-in for torch inside the rig's vLLM stand-in images (no real GPU exists); answers version/arch questions only.
from torch import _BUILD

__version__ = "%s+cu%s" % (_BUILD["torch"], _BUILD["cuda"].replace(".", ""))
cuda = _BUILD["cuda"]
git_version = "standin"
