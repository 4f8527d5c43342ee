"""ComfyUI-MoGA: the ComfyUI entry point.

ComfyUI imports this file as a package when the repository sits in ``ComfyUI/custom_nodes/``. It registers the
node pack through ``comfy_entrypoint`` (the ``comfy_api.latest`` extension API) and loads nothing heavy: no model,
no checkpoint, no kernels. Models load when a workflow runs.
"""
import importlib.util
import logging
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _register_library():
    """Make this pack's own ``moga`` library importable as ``moga`` without touching sys.path.

    Putting the pack folder on sys.path would shadow ComfyUI's own ``nodes`` module with ours, so only the one
    name ``moga`` is registered, from this folder (the copy the nodes were written against).
    """
    ours = os.path.join(_HERE, "moga")
    loaded = sys.modules.get("moga")
    if loaded is not None:
        where = os.path.dirname(os.path.abspath(getattr(loaded, "__file__", "") or ""))
        if where != ours:
            logging.warning("ComfyUI-MoGA: a different 'moga' package is already imported from %s; the nodes use it "
                            "instead of %s. Uninstall the other one if the nodes misbehave.", where, ours)
        return
    spec = importlib.util.spec_from_file_location("moga", os.path.join(ours, "__init__.py"),
                                                  submodule_search_locations=[ours])
    module = importlib.util.module_from_spec(spec)
    sys.modules["moga"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["moga"]
        raise


def _inside_comfyui() -> bool:
    # ComfyUI has imported its folder_paths before it loads custom nodes; pytest (which imports a package's
    # __init__.py when collecting the tests below it) and plain Python have not.
    return "folder_paths" in sys.modules


if _inside_comfyui():
    try:
        import comfy_api.latest  # noqa: F401  (the node API this pack is written for)
    except ImportError as e:
        raise ImportError("ComfyUI-MoGA needs ComfyUI 0.3.64 or newer (the comfy_api.latest node API): update "
                          "ComfyUI") from e
    _register_library()
    from .nodes import NODES, comfy_entrypoint  # noqa: E402,F401  (needs the library registered first)

    __all__ = ["NODES", "comfy_entrypoint"]
