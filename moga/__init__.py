"""moga: Mixture-of-Groups Attention for long multi-shot video DiTs (plain PyTorch; never imports ComfyUI)."""
__version__ = "0.1.0"
