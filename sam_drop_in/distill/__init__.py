"""Distillation of SAM image encoders into TinyViT (MobileSAM / TinySAM), and scale-out labelling.

Submodules (imported on use, so ``import sam_drop_in.distill`` stays cheap):

- :mod:`.embed` -- ``embed_folder``: teacher embeddings to safetensors shards + manifest.
- :mod:`.train` -- ``TrainConfig``, ``train``: decoupled / full-stage distillation, DDP, resume.
- :mod:`.evaluate` -- ``evaluate``, ``evaluate_files``: student-vs-teacher mIoU and embedding MSE.
- :mod:`.ray_label` -- ``label_folder``: everything-mode COCO-RLE JSON lines, local or Ray Data.
- :mod:`.cli` -- ``python -m sam_drop_in.distill`` (the ``sam-drop-in distill`` command of :mod:`sam_drop_in.cli`).
"""

__all__ = ["embed", "train", "evaluate", "ray_label", "cli"]
