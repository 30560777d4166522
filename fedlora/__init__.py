"""fedlora: privacy-preserving federated LoRA fine-tuning.

``fedlora.load_adapter(PATH)`` returns a saved adapter on its base model, ready to use, and its
tokenizer (``fedlora.saved_adapter``). It is imported on first use: ``fedlora certs`` and
``fedlora site key`` need neither torch nor transformers.
"""

__all__ = ["load_adapter"]


def __getattr__(name: str):
    if name == "load_adapter":
        from fedlora.saved_adapter import load_adapter

        return load_adapter
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")
