"""What users run around the library: the ``flowcut`` CLI, evaluation, benchmark and visualisation."""
