"""vitef: plasticity analysis and component-wise finetuning of vision transformers.

The successor of the research code of "Vision Transformer Finetuning Benefits from Non-Smooth
Components" (Odonnat, Chapel, Tavenard, Redko; arXiv 2602.06883). Importing the package does no work.
"""

__version__ = "0.1.0"
