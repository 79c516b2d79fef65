"""What the programs (main.py, search_videos.py, the demo, the analysis tools) share and the model library
does not need: CPU/device settings (``runtime.cpu``), autocast settings (``runtime.precision``), atomic file
writes (``runtime.files``), the one-line error convention (``runtime.errors``), logging (``runtime.logs``) and
the model's flags, made from DGLConfig's fields (``runtime.model_flags``).

Imports only ``modules`` and ``dataloaders`` from this project.
"""
