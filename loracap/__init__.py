"""loracap: caption image folders for LoRA / DreamBooth training.

The import is kept light: torch and transformers load only when a model is used.
"""

__version__ = "0.1.0"
