"""The command line (``nemo-curator-image``, see ``cli``), the demo (``demo``) and model set-up helpers (``models``)."""
