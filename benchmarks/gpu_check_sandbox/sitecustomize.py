"""Makes this Python look like the lent GPU machine: the modules named in UNSUP3D_HIDE_MODULES
(comma-separated, e.g. "ray,nvidia.dali,s3fs") cannot be found, as if not installed.

scripts/gpu_check.sh --tiny puts this folder first on PYTHONPATH, so the CPU rehearsal fails where the
GPU run would (an import of Ray or DALI on the `--no-ray` path, say) instead of wasting GPU minutes.
Not used on the GPU machine itself. Works by wrapping the path finder: importlib.util.find_spec then
answers None, import raises ModuleNotFoundError and importlib.metadata finds no distribution, as for
a package that is not installed.
"""

import os
import sys
from importlib.machinery import PathFinder

HIDDEN = tuple(name.strip() for name in os.environ.get("UNSUP3D_HIDE_MODULES", "").split(",") if name.strip())


class _HidingPathFinder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if any(name == hidden or name.startswith(hidden + ".") for hidden in HIDDEN):
            return None
        return PathFinder.find_spec(name, path, target)

    @classmethod
    def find_distributions(cls, *args, **kwargs):
        """importlib.metadata asks the path finder too: hide the same packages' metadata."""
        hidden = tuple(name.replace(".", "-").replace("_", "-").lower() for name in HIDDEN)
        for dist in PathFinder.find_distributions(*args, **kwargs):
            name = (dist.metadata["Name"] or "").replace("_", "-").lower()
            if not any(name == h or name.startswith(h + "-") for h in hidden):
                yield dist

    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()


if HIDDEN:
    sys.meta_path[:] = [_HidingPathFinder if finder is PathFinder else finder for finder in sys.meta_path]
