"""The MoGA node pack: ten thin nodes over the moga library, registered with ComfyUI's extension API."""
from comfy_api.latest import ComfyExtension, io

from .decode import MoGADecode
from .loader import MoGAModelLoader
from .lora import MoGALora
from .patch import MoGAPatchModel, MoGARouterLoader
from .patch_shots import EmptyMultiShotLatent, MoGAShotConditioning
from .sampler import MoGASampler
from .settings import MoGAAttentionSettings
from .shots import MoGAShotPrompts

NODES = [MoGAModelLoader, MoGALora, MoGAAttentionSettings, MoGAShotPrompts, MoGASampler, MoGADecode,
         MoGARouterLoader, MoGAPatchModel, MoGAShotConditioning, EmptyMultiShotLatent]


class MoGAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MoGAExtension:
    return MoGAExtension()
