"""Studies: QualiTeacher against its baselines and ablations, over seeds, on measures training did
not see (``qualiteacher study``). ``modes`` is the catalogue of training modes, ``runner`` the
driver; ``measures`` and ``report`` turn trained runs into rows, tables and a figure."""
